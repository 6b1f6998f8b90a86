"""Renderers of a run report: ``report.md`` (tables of knowledge retained vs bytes stored,
stages, their details and per-module errors, the gate, wrong answers) and
``retention_vs_size.png``. They read the report dict only (``report.py`` builds it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from knowpress.evaluate.gate import describe_bounds
from knowpress.models.io import atomic_file


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
        details = dict(s.get("details") or {})
        modules = details.pop("modules", None)
        if details:
            lines += ["", f"Stage {s['index'] + 1} ({s['kind']}) details:", ""]
            lines += [f"- {key}: {_detail(value)}" for key, value in details.items()]
        if modules:
            lines += _module_errors(s, modules)
    return lines


def _module_errors(stage: dict[str, Any], modules: dict[str, dict[str, float]]) -> list[str]:
    """The ten modules whose outputs moved most on the calibration data (``details.modules``:
    relative MSE and SQNR of each quantized module's output)."""
    worst = sorted(modules.items(), key=lambda item: -(item[1].get("rel_mse") or 0.0))[:10]
    lines = [
        "",
        f"Stage {stage['index'] + 1}: the {len(worst)} modules with the largest output error "
        f"on calibration data (of {len(modules)})",
        "",
        "| module | relative output MSE | output SQNR (dB) |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {_fmt(err.get('rel_mse'), 6)} | {_fmt(err.get('sqnr_db'), 2)} |"
              for name, err in worst]  # fmt: skip
    return lines


def _detail(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_detail(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value[:20])) + (
            f" and {len(value) - 20} more" if len(value) > 20 else ""
        )
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
