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
from knowpress.evaluate.gate import check
from knowpress.evaluate.text import world_record
from knowpress.models.io import atomic_write_text
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


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from knowpress.render import render_markdown, render_plot

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
