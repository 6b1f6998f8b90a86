"""The gate: pass when every gated task keeps enough knowledge, so CI can fail a run.

Checks the report's final row (the output of the last stage). A task fails when its
retention is below ``min_retention``, or, with a baseline report, when it dropped more than
``tolerance`` below the baseline's retention for the same task. An undefined retention (NaN:
reference scored 0) fails: it cannot show that knowledge held. Tasks whose reference score is
near chance are skipped unless named in ``tasks``: their retention means nothing.

A gate never passes by default: thresholds must be finite (``0 < min_retention <= 1``,
``tolerance >= 0``), a report without a stage row has nothing to gate, a gate left with no
task to check fails, and a baseline must come from the same world and score the gated tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from knowpress.errors import KnowpressError, short

FIELDS = ("min_retention", "tolerance")


@dataclass(frozen=True)
class Failure:
    task: str
    retention: float
    floor: float
    reason: str


@dataclass(frozen=True)
class GateResult:
    passed: bool
    row: str
    min_retention: float | None
    baseline: str | None
    failures: list[Failure] = field(default_factory=list)
    #: near-chance tasks left out of a default gate (their retention means nothing)
    skipped: list[str] = field(default_factory=list)
    max_kl: float | None = None
    min_top1: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_thresholds(
    min_retention: float | None, tolerance: float, fields: tuple[str, str] = FIELDS
) -> None:
    """One line per threshold a gate cannot mean (NaN passes every comparison's negation)."""
    if min_retention is not None and not (math.isfinite(min_retention) and 0 < min_retention <= 1):
        raise KnowpressError(
            f"{fields[0]}: {min_retention} is not a retention floor; give a number in (0, 1]"
        )
    if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise KnowpressError(
            f"{fields[1]}: {tolerance} is not a drop allowance; give a number in [0, 1)"
        )


def check_baseline(report: dict[str, Any], baseline: dict[str, Any], names: list[str]) -> None:
    """A baseline must measure the same world and the gated tasks with the same metrics."""
    world, base_world = report["inputs"]["world"]["key"], baseline["inputs"]["world"]["key"]
    if world != base_world:
        raise KnowpressError(
            f"--baseline: it measured world {base_world}, this report world {world}; compare "
            f"runs on the same world"
        )
    missing = [t for t in names if t not in baseline["tasks"]]
    if missing:
        raise KnowpressError(
            f"--baseline: it has no {', '.join(missing)} (it scored "
            f"{', '.join(baseline['tasks'])}); gate the tasks both reports share with --tasks"
        )
    other = [t for t in names if baseline["tasks"][t]["metric"] != report["tasks"][t]["metric"]]
    if other:
        raise KnowpressError(f"--baseline: {other[0]} is scored with another metric there")


def check(
    report: dict[str, Any],
    min_retention: float | None,
    tasks: list[str] | None = None,
    baseline: dict[str, Any] | None = None,
    baseline_name: str | None = None,
    tolerance: float = 0.01,
    fields: tuple[str, str] = FIELDS,
    max_kl: float | None = None,
    min_top1: float | None = None,
) -> GateResult:
    """Gate the final row of ``report`` (see module docstring); ``fields`` name the
    thresholds in error lines (``--min-retention`` on the command line). ``max_kl`` and
    ``min_top1`` bound the ``kl`` task's score and top-1 agreement directly."""
    bounds_kl = max_kl is not None or min_top1 is not None
    if min_retention is None and baseline is None and not bounds_kl:
        raise KnowpressError("the gate needs min_retention, max_kl, min_top1 or a baseline report")
    check_thresholds(min_retention, tolerance, fields)
    check_kl_bounds(max_kl, min_top1)
    if len(report["rows"]) < 2:
        raise KnowpressError("the report has no stage rows (stages: []): there is nothing to gate")
    row = report["rows"][-1]
    kl_failures = _kl_failures(row, max_kl, min_top1)
    if min_retention is None and baseline is None:
        return GateResult(
            not kl_failures, row["name"], None, None, kl_failures, [], max_kl, min_top1
        )
    if tasks:
        names, skipped = list(tasks), []
        unknown = [t for t in names if t not in row["retention"]]
        if unknown:
            raise KnowpressError(
                f"tasks: {short(unknown[0], 60)!r} is not in the report (it scored "
                f"{', '.join(row['retention'])})"
            )
    else:
        near = {t for t, info in report["tasks"].items() if info.get("near_chance")}
        names = [t for t in row["retention"] if t not in near]
        skipped = [t for t in row["retention"] if t in near]
    if baseline is not None:
        check_baseline(report, baseline, [t for t in names if t in row["retention"]])
    floor = min_retention or 0.0
    failures: list[Failure] = []
    if not names:
        why = f"every task's reference score is near chance ({', '.join(skipped)})"
        failures.append(Failure("(none)", math.nan, floor, f"nothing gated: {why}"))
    base_row = baseline["rows"][-1] if baseline is not None else None
    for name in names:
        failures += _task_failures(name, row, base_row, min_retention, tolerance)
    failures += kl_failures
    return GateResult(
        not failures, row["name"], min_retention, baseline_name, failures, skipped, max_kl,
        min_top1,
    )  # fmt: skip


def describe_bounds(gate: dict[str, Any]) -> str:
    """``min retention 0.9, max kl 0.05`` for the bounds a gate (result or spec) sets."""
    names = {"min_retention": "min retention", "max_kl": "max kl", "min_top1": "min top-1"}
    parts = [f"{label} {gate[key]}" for key, label in names.items() if gate.get(key) is not None]
    return ", ".join(parts) or "baseline only"


def check_kl_bounds(max_kl: float | None, min_top1: float | None) -> None:
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl > 0):
        raise KnowpressError(f"max_kl: {max_kl} is not a KL bound; give a positive number")
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 < min_top1 <= 1):
        raise KnowpressError(f"min_top1: {min_top1} is not an agreement floor; give one in (0, 1]")


def _kl_failures(
    row: dict[str, Any], max_kl: float | None, min_top1: float | None
) -> list[Failure]:
    if max_kl is None and min_top1 is None:
        return []
    if row["scores"].get("kl") is None:
        return [Failure("kl", math.nan, max_kl or min_top1 or 0.0, "task not in report")]
    failures = []
    value = row["scores"]["kl"]
    if max_kl is not None and not value <= max_kl:
        failures.append(Failure("kl", value, max_kl, "above max_kl"))
    top1 = row["details"]["kl"]["extra"].get("top1", math.nan)
    if min_top1 is not None and not top1 >= min_top1:
        failures.append(Failure("kl/top1", top1, min_top1, "below min_top1"))
    return failures


def _task_failures(
    name: str,
    row: dict[str, Any],
    base_row: dict[str, Any] | None,
    min_retention: float | None,
    tolerance: float,
) -> list[Failure]:
    floor = min_retention or 0.0
    if name not in row["retention"]:
        return [Failure(name, math.nan, floor, "task not in report")]
    value = row["retention"][name]
    if value is None or math.isnan(value):
        return [Failure(name, math.nan, floor, "retention undefined")]
    failures = []
    if min_retention is not None and value < min_retention:
        failures.append(Failure(name, value, min_retention, "below min_retention"))
    before = None if base_row is None else base_row["retention"].get(name)
    if before is not None and value < before - tolerance:
        failures.append(
            Failure(name, value, before - tolerance, f"regressed from baseline {before:.4f}")
        )
    return failures
