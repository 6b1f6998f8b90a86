"""The run report: ``report.json`` (versioned), ``report.md`` and ``retention_vs_size.png``.

``report.json`` (schema_version 2)::

    {"schema": "knowpress.report", "schema_version": 2, "knowpress_version": str,
     "created_utc": str, "inputs": {"model", "reference", "teacher", "world"},
     "recipe": {...}, "reference_bf16_bytes": int,
     "tasks": {name: {"metric", "higher_is_better", "relative", "chance": float|null,
                      "near_chance": bool}},
     "warnings": [str],
     "rows": [{"name", "stage_index", "kind", "stored_bytes", "size_vs_bf16_reference",
               "parameters", "bits_per_parameter", "kv_bytes_per_token",
               "runtime": {"runtime", "device", "dtype", "kv_policy"},
               "scores": {task: float}, "retention": {task: float|null},
               "worst_task", "worst_retention", "details": {task: {"n", "extra", "examples"}}}],
     "stages": [StageRecord...], "gate": GateResult | null}

Row 0 is the reference (retention 1 by definition); then one row per stage. ``stored_bytes``
is the artifact's payload on disk (``models/artifact.py``); ``size_vs_bf16_reference`` divides
it by the reference's safetensors with every float tensor in bfloat16 (what is deployed,
``reference_bf16_bytes``); ``bits_per_parameter`` = 8 · stored bytes / logical parameters;
``kv_bytes_per_token`` is measured on the runtime's cache (its KV policy, or the full cache);
``runtime`` says on which device and in which dtype the row was measured. Tasks that are not
``relative`` (``kl``) have no retention; ``warnings`` say what makes the figures mean less
than they seem (a reference near chance on every world task, text the tokenizer hardly
knows). ``near_chance``:
the reference scored below 2x the task's chance score, so its retention measures little. A
row with a ``bits`` score gets ``details.bits.extra.bits_per_stored_byte``. Schema 1 (before
the artifact manifest) differs in sizes only; ``load_report`` reads both for gating.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from knowpress.context import StageRecord
from knowpress.errors import short
from knowpress.evaluate.evaluator import Measurement, TaskScore, retention_table, worst
from knowpress.evaluate.gate import check, describe_bounds
from knowpress.evaluate.text import world_record
from knowpress.models.io import atomic_file, atomic_write_text
from knowpress.models.sizes import bits_per_parameter
from knowpress.recipe import Recipe

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("schema", "schema_version", "inputs", "recipe", "tasks", "rows", "stages", "gate")


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def knowpress_version() -> str:
    try:
        return version("knowpress")
    except PackageNotFoundError:
        return "unknown"


def _row(
    name: str,
    record: StageRecord | None,
    measurement: Measurement,
    reference: Measurement,
    reference_bf16_bytes: int,
) -> dict[str, Any]:
    scores, size = measurement.scores, measurement.stored_bytes
    retention = retention_table(scores, reference.scores)
    worst_task, worst_value = worst(retention)
    return {
        "name": name,
        "stage_index": None if record is None else record.index,
        "kind": None if record is None else record.kind,
        "stored_bytes": size,
        "size_vs_bf16_reference": size / reference_bf16_bytes,
        "parameters": measurement.parameters,
        "bits_per_parameter": bits_per_parameter(size, measurement.parameters),
        "kv_bytes_per_token": measurement.kv_bytes_per_token,
        "runtime": measurement.runtime,
        "scores": {t: s.score for t, s in scores.items()},
        "retention": retention,
        "worst_task": worst_task,
        "worst_retention": worst_value,
        "details": {
            t: {"n": s.n, "extra": _extra(t, s, size), "examples": s.examples}
            for t, s in scores.items()
        },
    }


def _extra(task: str, score: TaskScore, size: int) -> dict[str, float]:
    """The task's extra metrics, plus bits per stored byte for ``bits`` (needs the size)."""
    if task != "bits" or size <= 0:
        return score.extra
    return {**score.extra, "bits_per_stored_byte": score.score / size}


def build_report(
    *,
    recipe: Recipe,
    inputs: dict[str, str],
    world: Any,
    reference: Measurement,
    reference_bf16_bytes: int,
    stages: list[tuple[StageRecord, Measurement]],
) -> dict[str, Any]:
    """The report of a run: the reference row, then one row per stage (see module doc)."""
    rows = [_row("reference", None, reference, reference, reference_bf16_bytes)]
    for record, measurement in stages:
        name = Path(record.checkpoint).name
        rows.append(_row(name, record, measurement, reference, reference_bf16_bytes))
    report: dict[str, Any] = {
        "schema": "knowpress.report",
        "schema_version": SCHEMA_VERSION,
        "knowpress_version": knowpress_version(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {**inputs, "world": world_record(world)},
        "recipe": recipe.dump(),
        "reference_bf16_bytes": reference_bf16_bytes,
        "tasks": {
            t: {
                "metric": s.metric,
                "higher_is_better": s.higher_is_better,
                "relative": s.relative,
                "chance": s.chance,
                "near_chance": s.near_chance,
            }
            for t, s in reference.scores.items()
        },
        "rows": rows,
        "stages": [dataclasses.asdict(r) for r, _ in stages],
        "gate": None,
    }
    report["warnings"] = warnings(report)
    gate = recipe.gate
    if gate is not None:
        result = check(report, gate.min_retention, gate.tasks, max_kl=gate.max_kl,
                       min_top1=gate.min_top1)  # fmt: skip
        report["gate"] = result.to_json()
    return _clean(report)


UNKNOWN_SHARE_WARNING = 0.10


def warnings(report: dict[str, Any]) -> list[str]:
    """What makes the figures mean less than they seem, said once at the top of the report."""
    out = []
    tasks = report["tasks"]
    world_tasks = [t for t, info in tasks.items() if info.get("chance") is not None]
    if world_tasks and all(tasks[t]["near_chance"] for t in world_tasks):
        out.append(
            f"the reference is near chance on every world task ({', '.join(world_tasks)}): this "
            f"world measures nothing it knows; score it on your own text instead: "
            f"evaluate: {{tasks: [kl], text: {{path: notes.txt}}}}"
        )
    perplexity = report["rows"][0]["details"].get("perplexity")
    share = (perplexity or {}).get("extra", {}).get("unknown_share", 0.0)
    if share > UNKNOWN_SHARE_WARNING:
        out.append(
            f"{share:.0%} of the held-out text's tokens are unknown to the tokenizer (<unk>): "
            f"perplexity leaves them out, and the text hardly fits this model; use kl on text "
            f"in its language"
        )
    return out


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _has_policy(report: dict[str, Any]) -> bool:
    return any((row.get("runtime") or {}).get("kv_policy") for row in report["rows"])


def _relative(report: dict[str, Any]) -> list[str]:
    """Tasks compared as retention (``kl`` is not: it already compares with the reference)."""
    return [t for t, info in report["tasks"].items() if info.get("relative", True)]


def _results_table(report: dict[str, Any]) -> list[str]:
    tasks, relative = list(report["tasks"]), _relative(report)
    kv = _has_policy(report)
    head = ["model", "stored", "size vs bf16 reference", "bits/param"]
    head += ["KV bytes/token", "KV policy"] if kv else []
    head += [f"{t} ({report['tasks'][t]['metric']})" for t in tasks]
    head += ["kl top-1"] if "kl" in tasks else []
    head += [f"{t} retention" for t in relative] + ["worst retention", "measured on"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        runtime = row.get("runtime") or {}
        cells = [row["name"], _bytes(row["stored_bytes"]), f"{row['size_vs_bf16_reference']:.3f}"]
        cells.append(f"{row['bits_per_parameter']:.2f}")
        if kv:
            cells += [f"{row['kv_bytes_per_token']:.0f}", runtime.get("kv_policy") or "full"]
        cells += [_fmt(row["scores"][t]) for t in tasks]
        if "kl" in tasks:
            cells.append(_fmt(row["details"]["kl"]["extra"].get("top1")))
        cells += [_fmt(row["retention"][t]) for t in relative]
        cells += [f"{_fmt(row['worst_retention'])} ({row['worst_task']})"]
        cells.append(f"{runtime.get('runtime', '?')} {runtime.get('device', '?')} "
                     f"{runtime.get('dtype', '?')}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Stored bytes: the artifact's payload on disk (weights and other model files; config "
        f"and tokenizer files excluded). Size is against the reference stored with every float "
        f"tensor in bfloat16 ({_bytes(report['reference_bf16_bytes'])}).",
    ]
    return lines


def _stage_lines(report: dict[str, Any]) -> list[str]:
    head = "# | kind | format | device | seconds | peak RSS | bytes before | bytes after | resumed"
    lines = ["", "## Stages", "", f"| {head} |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(
            f"| {s['index'] + 1} | {s['kind']} | {s.get('format', 'hf')} | "
            f"{s.get('device', 'cpu')} | {s['seconds']:.1f} | "
            f"{_bytes(s['peak_rss_bytes'])} | {_bytes(s['bytes_before'])} | "
            f"{_bytes(s['bytes_after'])} | {'yes' if s['resumed'] else 'no'} |"
        )
    for s in report["stages"]:
        if s.get("details"):
            lines += ["", f"Stage {s['index'] + 1} ({s['kind']}) details:", ""]
            lines += [f"- {key}: {_detail(value)}" for key, value in s["details"].items()]
    return lines


def _detail(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _gate_lines(gate: dict[str, Any]) -> list[str]:
    verdict = "PASSED" if gate["passed"] else "FAILED"
    lines = ["", f"## Gate: {verdict} ({describe_bounds(gate)})", ""]
    for f in gate["failures"]:
        lines.append(
            f"- `{f['task']}`: retention {_fmt(f['retention'])} < {f['floor']} ({f['reason']})"
        )
    if gate.get("skipped"):
        lines.append(f"- not gated (reference near chance): {', '.join(gate['skipped'])}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    tasks = list(report["tasks"])
    inputs = report["inputs"]
    lines = ["# knowpress report", ""]
    lines += [f"- {name}: `{inputs[name]}`" for name in ("model", "reference", "teacher")]
    lines += [f"- world: `{inputs['world']['key']}`", ""]
    lines += [f"> **warning:** {w}" for w in report.get("warnings", [])]
    lines += [""] if report.get("warnings") else []
    lines += ["## Knowledge retained vs bytes stored", ""]
    lines += _results_table(report)
    near = [t for t in tasks if report["tasks"][t].get("near_chance")]
    if near:
        lines += [
            "",
            "Near chance (reference < 2x chance, retention not meaningful): "
            + ", ".join(f"`{t}` (chance {_fmt(report['tasks'][t]['chance'])})" for t in near),
        ]
    if report["stages"]:
        lines += _stage_lines(report)
    if report.get("gate") is not None:
        lines += _gate_lines(report["gate"])
    final = report["rows"][-1]
    examples = [(t, d["examples"]) for t, d in final["details"].items() if d["examples"]]
    if examples:
        lines += ["", f"## Wrong answers of `{final['name']}` (first few)", ""]
        for task, items in examples:
            for ex in items:
                lines.append(
                    f"- {task}: `{ex['prompt']}` gold `{ex['gold']}`, got `{ex['prediction']}`"
                )
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    tasks = _relative(report)
    xs = [row["stored_bytes"] / 2**20 for row in report["rows"]]
    for task in tasks:
        ys = [row["retention"][task] for row in report["rows"]]
        ax.plot(xs, [math.nan if y is None else y for y in ys], "o", alpha=0.6, label=task)
    worst_y = [row["worst_retention"] for row in report["rows"]]
    ax.plot(xs, [math.nan if y is None else y for y in worst_y], "k-", lw=1, label="worst task")
    for x, y, row in zip(xs, worst_y, report["rows"], strict=True):
        if y is not None:
            ax.annotate(
                row["name"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7
            )
    gate = report.get("gate")
    if gate and gate.get("min_retention") is not None:
        ax.axhline(gate["min_retention"], color="r", ls="--", lw=1, label="gate")
    ax.set_xlabel("stored bytes (MiB)")
    ax.set_ylabel("retention vs reference")
    ax.set_title("knowledge retained vs bytes stored")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    render_plot(report, out_dir / "retention_vs_size.png")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Row(_Loose):
    name: str
    retention: dict[str, float | None]


class _Task(_Loose):
    metric: str
    near_chance: bool = False


class _World(_Loose):
    key: str


class _Inputs(_Loose):
    world: _World


class _Gate(_Loose):
    min_retention: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None


class _Schema(_Loose):
    """The fields the gate reads; a report missing or mangling one is refused in one line."""

    inputs: _Inputs
    gate: _Gate | None
    tasks: dict[str, _Task]
    rows: list[_Row] = Field(min_length=1)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json (schema keys, version and the fields the gate reads)."""
    from knowpress.errors import KnowpressError

    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise KnowpressError(f"{path}: no such report (give OUT/report.json)")
    if not path.is_file():
        raise KnowpressError(f"{path}: not a regular file (give OUT/report.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KnowpressError(f"{path}: not a text file (give OUT/report.json)") from None
    except json.JSONDecodeError as exc:
        raise KnowpressError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise KnowpressError(f"{path}: nested too deeply to be a report") from None
    missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else ["all"]
    if missing or data.get("schema") != "knowpress.report":
        raise KnowpressError(f"{path}: not a knowpress report (missing {short(missing)})")
    if data["schema_version"] not in READABLE_VERSIONS:
        raise KnowpressError(
            f"{path}: report schema_version {short(data['schema_version'], 40)} is not "
            f"supported (this knowpress reads {', '.join(map(str, READABLE_VERSIONS))}); "
            f"re-run the recipe"
        )
    try:
        _Schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise KnowpressError(f"{path}: {short(where, 80)}: {first['msg']}") from None
    return data
