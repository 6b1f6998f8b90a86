"""Renderers of a run report: ``report.md`` (tables of knowledge retained vs bytes stored,
stages, their details and per-module errors, the gate, wrong answers) and
``retention_vs_size.png``. They read the report dict only (``report.py`` builds it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from knowpress.core.io import atomic_file
from knowpress.evaluate.gate import describe_bounds


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


def _interval(bounds: list[float] | None, digits: int = 4) -> str:
    return "" if not bounds else f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _cell(value: float | None, bounds: list[float] | None, significant: bool = False) -> str:
    """``0.9977 [0.9950, 1.0000]``: a figure with its interval (when the row has one);
    ``significant``: 4 significant digits (KL spans orders of magnitude)."""
    if value is None:
        return "n/a"
    if not significant:
        return _fmt(value) + _interval(bounds)
    shown = f"{value:.4g}"
    return shown + ("" if not bounds else f" [{bounds[0]:.4g}, {bounds[1]:.4g}]")


def _results_table(report: dict[str, Any]) -> list[str]:
    tasks, relative = list(report["tasks"]), _relative(report)
    kv = _has_policy(report)
    head = ["model", "stored", "size vs bf16 reference", "bits/param"]
    head += ["KV bytes/token", "KV policy"] if kv else []
    head += [f"{t} ({report['tasks'][t]['metric']})" for t in tasks]
    head += ["kl top-1"] if "kl" in tasks else []
    head += [f"{t} retention" for t in relative] + (["worst retention"] if relative else [])
    head += ["measured on"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        runtime, intervals = row.get("runtime") or {}, row.get("intervals") or {}
        flag = (row.get("compression") or {}).get("flag")
        name = row["name"] + (f" (**did not compress: {flag}**)" if flag else "")
        cells = [name, _bytes(row["stored_bytes"]), f"{row['size_vs_bf16_reference']:.3f}"]
        cells.append(f"{row['bits_per_parameter']:.2f}")
        if kv:
            cells += [f"{row['kv_bytes_per_token']:.0f}", runtime.get("kv_policy") or "full"]
        cells += [_cell(row["scores"][t], (intervals.get(t) or {}).get("score"), t == "kl")
                  for t in tasks]  # fmt: skip
        if "kl" in tasks:
            top1 = row["details"]["kl"]["extra"].get("top1")
            cells.append(_cell(top1, (intervals.get("kl") or {}).get("top1")))
        cells += [_cell(row["retention"][t], (intervals.get(t) or {}).get("retention"))
                  for t in relative]  # fmt: skip
        if relative:
            worst = row["worst_task"]
            cells.append(f"{_fmt(row['worst_retention'])} ({worst})" if worst else "n/a")
        cells.append(f"{runtime.get('runtime', '?')} {runtime.get('device', '?')} "
                     f"{runtime.get('dtype', '?')}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines + _table_notes(report)


def _table_notes(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Stored bytes: the artifact's payload on disk (weights and other model files; config "
        f"and tokenizer files excluded). Size is against the reference stored with every float "
        f"tensor in bfloat16 ({_bytes(report['reference_bf16_bytes'])}).",
    ]
    info = report.get("uncertainty")
    if info:
        lines += [
            "",
            f"[brackets]: {info['confidence']:.0%} intervals: {info['interval']} "
            f"({info['resamples']} resamples, seed {info['seed']}).",
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
        shown = f"{_fmt(f['retention'])}{_interval(f.get('interval'))}"
        floor = "" if f["floor"] is None else f" vs {f['floor']}"
        lines.append(f"- `{f['task']}`: {shown}{floor} ({f['reason']})")
    if gate.get("skipped"):
        lines.append(f"- not gated (reference near chance): {', '.join(gate['skipped'])}")
    level = gate.get("interval_confidence", 0.95)
    for c in gate.get("checked") or []:
        mde = f", smallest drop detectable (MDE) {c['mde']:.3g}" if c.get("mde") else ""
        lines.append(
            f"- `{c['task']}` {c.get('measure', 'retention')} {_fmt(c.get('value'))}, "
            f"{level:.0%} interval{_interval(c['interval']) or ' n/a'}{mde}"
        )
    return lines


def _paired_lines(report: dict[str, Any]) -> list[str]:
    """Flips against the reference per stage row and task, with intervals and McNemar's p."""
    rows = [(row, task, p) for row in report["rows"][1:]
            for task, p in (row.get("paired") or {}).items()]  # fmt: skip
    if not rows:
        return []
    info = report.get("uncertainty") or {"confidence": 0.95, "alpha": 0.05, "power": 0.8}
    lines = [
        "", "## Flips against the reference", "",
        f"Items the reference gets right and the model wrong (lost) and the reverse (gained), "
        f"with {info['confidence']:.0%} intervals; McNemar: exact two-sided test that losses "
        f"and gains are equally likely (QA items; kl counts text tokens, which are not "
        f"independent, so it gets none); MDE: the smallest retention drop the item count "
        f"detects (alpha {info['alpha']}, power {info['power']}).",
        "", "| model | task | items | lost | gained | McNemar p | MDE |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row, task, p in rows:
        mde = ((row.get("intervals") or {}).get(task) or {}).get("mde")
        lost = f"{p['lost']} ({_share(p['lost_share'], p['lost_interval'])})"
        gained = f"{p['gained']} ({_share(p['gained_share'], p['gained_interval'])})"
        unit = f" {p['unit']}" if p.get("unit") else ""
        shown = "n/a" if mde is None else f"{mde:.3g}"
        lines.append(f"| {row['name']} | {task} | {p['n']}{unit} | {lost} | {gained} | "
                     f"{_fmt(p['mcnemar_p'], 3)} | {shown} |")  # fmt: skip
    return lines


def _share(share: float, bounds: list[float] | None) -> str:
    """``0.21% [0.00%, 0.51%]``."""
    return f"{share:.2%}" + ("" if not bounds else f" [{bounds[0]:.2%}, {bounds[1]:.2%}]")


def _inputs_lines(inputs: dict[str, Any]) -> list[str]:
    """Model, reference, teacher, and what they were measured on: a fact world, a text (a
    text-only run has no world: its record's config *is* the text's), or both."""
    lines = [f"- {name}: `{inputs[name]}`" for name in ("model", "reference", "teacher")]
    world, text = inputs["world"], inputs["world"].get("text")
    described = None if text is None else (
        f"`{text['path']}` ({text['texts']} text{'' if text['texts'] == 1 else 's'}, "
        f"sha256 {str(text['sha256'])[:12]})"
    )  # fmt: skip
    if text is not None and world.get("config") == text:
        lines.append(f"- measured on text: {described} (no fact world)")
    elif text is not None:
        lines.append(f"- world: `{world['key']}` with text {described}")
    else:
        lines.append(f"- world: `{world['key']}`")
    return lines


def _execution_lines(execution: dict[str, Any] | None) -> list[str]:
    """Device, compute dtype (and whether ``auto`` picked it), evaluation batch and offload."""
    if not execution:
        return []
    auto = " (auto)" if execution.get("compute_dtype_from") == "auto" else ""
    batch = execution.get("batch_size_from") or ""
    offload = "; models offloaded with device_map auto (slow)" if execution.get("offload") else ""
    size = execution.get("batch_size") or "-"
    return [f"- ran on {execution['device']} in {execution['compute_dtype']}{auto}; "
            f"evaluated in batches of {size} ({batch}){offload}"]  # fmt: skip


def render_markdown(report: dict[str, Any]) -> str:
    tasks = list(report["tasks"])
    lines = ["# knowpress report", "", *_inputs_lines(report["inputs"])]
    lines += [*_execution_lines(report.get("execution")), ""]
    lines += [f"> **warning:** {w}" for w in report.get("warnings", [])]
    lines += [""] if report.get("warnings") else []
    lines += ["## Knowledge retained vs bytes stored", ""]
    lines += _results_table(report)
    near = [t for t in tasks if report["tasks"][t].get("near_chance")]
    if near:
        lines += [
            "",
            "Near chance (reference < 2x chance, retention not meaningful; left out of the "
            "worst retention and of a default gate): "
            + ", ".join(f"`{t}` (chance {_fmt(report['tasks'][t]['chance'])})" for t in near),
        ]
    lines += _paired_lines(report)
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


def _yerr(values: list[float], bounds: list[list[float] | None]) -> list[list[float]]:
    """Error bar lengths below and above each value (0 where there is no interval)."""
    low = [
        0.0 if b is None or math.isnan(v) else max(v - b[0], 0.0)
        for v, b in zip(values, bounds, strict=True)
    ]
    high = [
        0.0 if b is None or math.isnan(v) else max(b[1] - v, 0.0)
        for v, b in zip(values, bounds, strict=True)
    ]
    return [low, high]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _label_points(ax: Any, xs: list[float], ys: list[float], rows: list[dict[str, Any]]) -> None:
    for x, y, row in zip(xs, ys, rows, strict=True):
        if not math.isnan(y):
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)  # fmt: skip


def _gate_line(ax: Any, value: float, label: str, **style: Any) -> None:
    """A gate bound as a horizontal line; one far outside the data (more than the data's span
    away) is named in the legend instead of squashing the points against an axis."""
    low, high = ax.get_ylim()
    span = max(high - low, 1e-9)
    if low - span <= value <= high + span:
        ax.axhline(value, lw=1, label=f"{label} {value:g}", **style)
        return
    ax.plot([], [], lw=1, label=f"{label} {value:g} (off the axis)", **style)
    ax.set_ylim(low, high)


def _retention_panel(ax: Any, report: dict[str, Any], xs: list[float]) -> None:
    """Retention per relative task with its interval as error bars; the worst task's line
    leaves out tasks near chance (drawn hollow)."""
    rows = report["rows"]
    for task in _relative(report):
        ys = [_nan(row["retention"][task]) for row in rows]
        bounds = [((row.get("intervals") or {}).get(task) or {}).get("retention") for row in rows]
        near = report["tasks"][task].get("near_chance")
        ax.errorbar(xs, ys, yerr=_yerr(ys, bounds), fmt="o", alpha=0.7, capsize=3,
                    mfc="none" if near else None,
                    label=f"{task} (near chance)" if near else task)  # fmt: skip
    worst = [_nan(row["worst_retention"]) for row in rows]
    if any(not math.isnan(y) for y in worst):
        ax.plot(xs, worst, "k-", lw=1, label="worst task")
        _label_points(ax, xs, worst, rows)
    gate = report.get("gate")
    if gate and gate.get("min_retention") is not None:  # always drawn: retention's scale is 0..1
        ax.axhline(gate["min_retention"], color="r", ls="--", lw=1,
                   label=f"gate {gate['min_retention']:g}")  # fmt: skip
    ax.set_ylabel("retention vs reference")
    ax.set_title("knowledge retained vs bytes stored")


def _kl_panel(ax: Any, report: dict[str, Any], xs: list[float]) -> None:
    """KL to the reference (left axis) and top-1 agreement (right axis) with intervals."""
    rows = report["rows"]
    kl = [_nan(row["scores"].get("kl")) for row in rows]
    kl_bounds = [((row.get("intervals") or {}).get("kl") or {}).get("score") for row in rows]
    ax.errorbar(xs, kl, yerr=_yerr(kl, kl_bounds), fmt="o-", color="C0", capsize=3,
                label="KL (nats/token)")  # fmt: skip
    _label_points(ax, xs, kl, rows)
    ax.set_ylabel("KL(reference || model), nats/token", color="C0")
    top = ax.twinx()
    top1 = [_nan(row["details"]["kl"]["extra"].get("top1")) for row in rows]
    top_bounds = [((row.get("intervals") or {}).get("kl") or {}).get("top1") for row in rows]
    top.errorbar(xs, top1, yerr=_yerr(top1, top_bounds), fmt="s--", color="C1", capsize=3,
                 label="top-1 agreement")  # fmt: skip
    top.set_ylabel("top-1 agreement with the reference", color="C1")
    gate = report.get("gate") or {}
    if gate.get("max_kl") is not None:
        _gate_line(ax, gate["max_kl"], "gate max_kl", color="r", ls="--")
    if gate.get("min_top1") is not None:
        _gate_line(top, gate["min_top1"], "gate min_top1", color="m", ls=":")
    handles = ax.get_legend_handles_labels()
    more = top.get_legend_handles_labels()
    # KL rises and top-1 falls towards few bytes (left): the right middle is usually free
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="center right")
    ax.set_title("distance from the reference vs bytes stored")


def plot_figure(report: dict[str, Any]) -> Any:
    """The figure of ``retention_vs_size.png``: one panel of retention per relative task (if
    any) and one of KL and top-1 (if kl was scored), each against stored bytes, with the
    rows' intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p, on in (("retention", bool(_relative(report))),
                              ("kl", "kl" in report["tasks"])) if on] or ["retention"]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), dpi=120,
                             squeeze=False)  # fmt: skip
    xs = [row["stored_bytes"] / 2**20 for row in report["rows"]]
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "retention":
            _retention_panel(ax, report, xs)
            ax.legend(fontsize=7)
        else:
            _kl_panel(ax, report, xs)
        ax.set_xlabel("stored bytes (MiB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def render_plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`plot_figure` to ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
