"""``compress check``: gate a report (exit 0 passed, 1 failed, 2 a report or option the gate
cannot read) and print every gated figure with its interval, minimum detectable effect and
flips against the reference (``evaluate/gate.py``)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from knowpress.core.errors import KnowpressError

THRESHOLDS = ("min_retention", "max_kl", "min_top1")
SETTINGS = ("confidence", "strict", "allow_no_compression")


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    """The interval and no-compression options of ``compress check``."""
    parser.add_argument(
        "--confidence", type=float, default=None,
        help="gate on intervals at this level (e.g. 0.95): a task fails only when its interval's "
        "upper bound is below --min-retention (default: the recipe's gate, else point values)",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true", default=None,
        help="with --confidence: fail unless the interval's lower bound clears the floor",
    )  # fmt: skip
    parser.add_argument(
        "--allow-no-compression", action="store_true", default=None,
        help="let stages that grew the model or changed nothing pass (the report flags them)",
    )  # fmt: skip


def _settings(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Thresholds and settings: the options given; without thresholds, the recipe's gate
    (bounds, confidence, strict). The recipe's ``allow_no_compression`` always holds: it says
    a stage is not meant to compress, whatever the bounds."""
    given = {key: getattr(args, key, None) for key in (*THRESHOLDS, *SETTINGS)}
    recipe_gate = report.get("gate") or {}
    if all(given[key] is None for key in THRESHOLDS) and recipe_gate:
        for key in (*THRESHOLDS, *SETTINGS):
            if given[key] is None:
                given[key] = recipe_gate.get(key)
    given["strict"] = bool(given["strict"])
    allowed = given["allow_no_compression"] or recipe_gate.get("allow_no_compression")
    given["allow_no_compression"] = bool(allowed)
    return given


def cmd_check(args: argparse.Namespace) -> int:
    from knowpress.cli.app import EXIT_GATE, out
    from knowpress.evaluate.gate import check
    from knowpress.pipeline.report import load_report

    report = load_report(args.report)
    baseline = load_report(args.baseline) if args.baseline else None
    given = _settings(args, report)
    if all(given[key] is None for key in THRESHOLDS) and baseline is None:
        raise KnowpressError(
            "check: nothing to check against; pass --min-retention X, --max-kl X, --min-top1 X "
            "and/or --baseline OLD"
        )
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    flags = ("--min-retention", "--tolerance")
    result = check(
        report, given["min_retention"], tasks, baseline, args.baseline, args.tolerance, flags,
        max_kl=given["max_kl"], min_top1=given["min_top1"], confidence=given["confidence"],
        strict=given["strict"], allow_no_compression=given["allow_no_compression"],
    ).to_json()  # fmt: skip
    if result["checked"]:
        out.print(checked_table(result))
    if not result["passed"]:
        out.print(gate_table(result))
        return EXIT_GATE
    near = ", ".join(result["skipped"])
    skipped = f" (near chance, not gated: {near})" if near else ""
    out.print(f"[green]gate passed[/green] on {result['row']}{skipped}")
    return 0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _sig(value: float | None) -> str:
    """3 significant digits: an MDE spans 1e-4 (perplexity) to 0.5 (a few items)."""
    return "n/a" if value is None else f"{value:.3g}"


def _bounds(bounds: list[float] | None, digits: int = 4) -> str:
    return "n/a" if not bounds else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def checked_table(result: dict[str, Any]) -> Table:
    """Each gated figure with its interval, MDE, flips (lost / gained) and McNemar's p, narrow
    enough for an 80-column terminal."""
    from knowpress.evaluate.gate import describe_bounds

    level = f"{result.get('interval_confidence', 0.95):.0%}"
    table = Table(
        title=f"gate on {result['row']} ({describe_bounds(result)})",
        caption=f"value: retention (kl: nats/token, kl/top1: agreement); {level} CI: paired "
        f"bootstrap; MDE: smallest retention drop detectable; flips: items lost/gained vs the "
        f"reference (tok: text tokens); p: exact McNemar",
    )
    for col in ("task", "value", f"{level} CI", "MDE", "flips -/+", "p"):
        table.add_column(col, justify="left" if col == "task" else "right", no_wrap=True)
    for c in result["checked"]:
        flips = c.get("flips") or {}
        lost = f"{flips['lost']}/{flips['gained']}" if flips else "n/a"
        if flips.get("unit"):
            lost += " tok"
        table.add_row(c["task"], _fmt(c.get("value")), _bounds(c.get("interval"), 3),
                      _sig(c.get("mde")), lost, _fmt(flips.get("mcnemar_p"), 3))  # fmt: skip
    return table


def gate_table(result: dict[str, Any]) -> Table:
    """The failures of a gate that failed."""
    table = Table(title=f"gate FAILED on {result['row']}")
    for col in ("task", "value", "interval", "floor", "reason"):
        table.add_column(col)
    for f in result["failures"]:
        floor = f["floor"]
        shown = "n/a" if floor is None or floor != floor else f"{floor:.4f}"
        table.add_row(f["task"], _fmt(f["retention"]), _bounds(f.get("interval")), shown,
                      f["reason"])  # fmt: skip
    return table
