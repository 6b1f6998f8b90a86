"""The gate: pass when every gated task keeps enough knowledge, so CI can fail a run.

Checks the report's final row (the output of the last stage). A task fails when its
retention is below ``min_retention``, or, with a baseline report, when it dropped more than
``tolerance`` below the baseline's retention for the same task. An undefined retention (NaN:
reference scored 0) fails: it cannot show that knowledge held. Tasks whose reference score is
near chance are skipped unless named in ``tasks``: their retention means nothing.

With ``confidence`` (e.g. 0.95) the floor is tested against the retention's paired bootstrap
interval at that level (``evaluate/intervals.py``) instead of the point value: a task fails
only when the interval's *upper* bound is below the floor (the drop is real at that
confidence), or, with ``strict``, when its *lower* bound is (retention is not shown to hold).
``max_kl`` / ``min_top1`` read the ``kl`` task's intervals the same way (fail when KL's lower
bound is above ``max_kl``, strict: its upper bound; top-1's upper bound below ``min_top1``,
strict: its lower bound). Each gated task's interval, minimum detectable effect and flips
with McNemar's p are listed in ``checked`` whether or not the gate uses them.

A stage row flagged as not compressing (``shrinkage.py``: it grew, or changed neither stored
bytes nor KV bytes per token) fails the gate unless ``allow_no_compression``.

A gate never passes by default: thresholds must be finite (``0 < min_retention <= 1``,
``tolerance >= 0``, ``0.5 <= confidence < 1``), a report without a stage row has nothing to
gate, a gate left with no task to check fails, and a baseline must come from the same world
and score the gated tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from knowpress.core.errors import KnowpressError, short
from knowpress.evaluate.gate_rows import (
    FIELDS,
    Bounds,
    Failure,
    checked_kl,
    checked_task,
    compression_failures,
    kl_failures,
)
from knowpress.evaluate.uncertainty import CONFIDENCE

__all__ = ["FIELDS", "Bounds", "Failure", "GateResult", "check", "describe_bounds"]


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
    confidence: float | None = None
    strict: bool = False
    allow_no_compression: bool = False
    #: per gated figure (a task's retention, kl, kl/top1): its value, interval at
    #: ``interval_confidence``, MDE and flips with McNemar's p
    checked: list[dict[str, Any]] = field(default_factory=list)
    interval_confidence: float = CONFIDENCE

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


def check_confidence(bounds: Bounds) -> None:
    if bounds.confidence is not None and not (0.5 <= bounds.confidence < 1):
        raise KnowpressError(
            f"{bounds.name('confidence')}: {bounds.confidence} is not a confidence level; give "
            f"a number in [0.5, 1), e.g. 0.95"
        )
    if bounds.strict and bounds.confidence is None:
        raise KnowpressError(
            f"{bounds.name('strict')} tests the interval's lower bound: give "
            f"{bounds.name('confidence')} too (e.g. 0.95)"
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
    *,
    confidence: float | None = None,
    strict: bool = False,
    allow_no_compression: bool = False,
) -> GateResult:
    """Gate the final row of ``report`` (see module docstring). ``max_kl`` and ``min_top1``
    bound the ``kl`` task's score and top-1 agreement directly."""
    b = Bounds(min_retention, tolerance, max_kl, min_top1, confidence, strict,
               allow_no_compression, fields)  # fmt: skip
    _validate(report, b, baseline)
    row = report["rows"][-1]
    failures: list[Failure] = []
    names: list[str] = []
    skipped: list[str] = []
    if min_retention is not None or baseline is not None:
        names, skipped = _gated_tasks(report, row, tasks)
        if baseline is not None:
            check_baseline(report, baseline, [t for t in names if t in row["retention"]])
        if not names:
            why = f"every task's reference score is near chance ({', '.join(skipped)})"
            failures.append(Failure("(none)", math.nan, min_retention or 0.0,
                                    f"nothing gated: {why}"))  # fmt: skip
    base_row = baseline["rows"][-1] if baseline is not None else None
    checked = [checked_task(report, t, confidence or CONFIDENCE) for t in names]
    for name, entry in zip(names, checked, strict=True):
        failures += _task_failures(name, row, base_row, b, entry)
    checked += checked_kl(row, b, confidence or CONFIDENCE)
    failures += kl_failures(row, b) + compression_failures(report, b.allow_no_compression)
    return GateResult(
        not failures, row["name"], min_retention, baseline_name, failures, skipped, max_kl,
        min_top1, confidence, strict, allow_no_compression, checked, confidence or CONFIDENCE,
    )  # fmt: skip


def _validate(report: dict[str, Any], b: Bounds, baseline: dict[str, Any] | None) -> None:
    """Everything a gate cannot mean, as one line (exit 2), before anything is gated."""
    bounds_kl = b.max_kl is not None or b.min_top1 is not None
    if b.min_retention is None and baseline is None and not bounds_kl:
        raise KnowpressError("the gate needs min_retention, max_kl, min_top1 or a baseline report")
    check_thresholds(b.min_retention, b.tolerance, b.fields)
    check_kl_bounds(b.max_kl, b.min_top1, b)
    check_confidence(b)
    if len(report["rows"]) < 2:
        raise KnowpressError("the report has no stage rows (stages: []): there is nothing to gate")
    if bounds_kl and "kl" not in report["tasks"]:
        flag = b.name("max_kl") if b.max_kl is not None else b.name("min_top1")
        raise KnowpressError(
            f"{flag}: the report has no kl task (it scored {', '.join(report['tasks'])}); "
            f"add kl to evaluate.tasks or gate without {flag}"
        )
    if b.confidence is not None and not any("items" in r for r in report["rows"]):
        raise KnowpressError(
            f"{b.name('confidence')}: this report (schema_version "
            f"{report.get('schema_version')}) keeps no per-item results to build intervals "
            f"from; re-run the recipe with this knowpress or gate without "
            f"{b.name('confidence')}"
        )


def _gated_tasks(
    report: dict[str, Any], row: dict[str, Any], tasks: list[str] | None
) -> tuple[list[str], list[str]]:
    """(gated, skipped as near chance): ``tasks`` as named, or every relative task whose
    reference is not near chance."""
    if tasks:
        unknown = [t for t in tasks if t not in row["retention"]]
        if unknown:
            raise KnowpressError(
                f"tasks: {short(unknown[0], 60)!r} is not in the report (it scored "
                f"{', '.join(row['retention'])})"
            )
        return list(tasks), []
    near = {t for t, info in report["tasks"].items() if info.get("near_chance")}
    return [t for t in row["retention"] if t not in near], [
        t for t in row["retention"] if t in near
    ]


def describe_bounds(gate: dict[str, Any]) -> str:
    """``min retention 0.9, max kl 0.05, confidence 0.95 (strict)`` for the bounds a gate
    (result or spec) sets."""
    names = {"min_retention": "min retention", "max_kl": "max kl", "min_top1": "min top-1"}
    parts = [f"{label} {gate[key]}" for key, label in names.items() if gate.get(key) is not None]
    if gate.get("confidence") is not None:
        parts.append(
            f"confidence {gate['confidence']}" + (" (strict)" if gate.get("strict") else "")
        )
    if gate.get("allow_no_compression"):
        parts.append("stages that do not compress allowed")
    return ", ".join(parts) or "baseline only"


def check_kl_bounds(max_kl: float | None, min_top1: float | None, b: Bounds | None = None) -> None:
    name = b.name if b is not None else (lambda key: key)
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl > 0):
        raise KnowpressError(
            f"{name('max_kl')}: {max_kl} is not a KL bound; give a positive number"
        )
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 < min_top1 <= 1):
        raise KnowpressError(
            f"{name('min_top1')}: {min_top1} is not an agreement floor; give one in (0, 1]"
        )


def _task_failures(
    name: str,
    row: dict[str, Any],
    base_row: dict[str, Any] | None,
    b: Bounds,
    entry: dict[str, Any],
) -> list[Failure]:
    floor = b.min_retention or 0.0
    if name not in row["retention"]:
        return [Failure(name, math.nan, floor, "task not in report")]
    value = row["retention"][name]
    if value is None or math.isnan(value):
        return [Failure(name, math.nan, floor, "retention undefined")]
    failures = []
    if b.min_retention is not None:
        failures += _floor_failure(name, value, entry.get("interval"), b)
    before = None if base_row is None else base_row["retention"].get(name)
    if before is not None and value < before - b.tolerance:
        failures.append(
            Failure(name, value, before - b.tolerance, f"regressed from baseline {before:.4f}")
        )
    return failures


def _floor_failure(
    name: str, value: float, interval: list[float] | None, b: Bounds
) -> list[Failure]:
    """The floor on the point value, or (with ``confidence``) on the interval's bound."""
    floor = b.min_retention
    assert floor is not None
    if b.confidence is None:
        return [Failure(name, value, floor, "below min_retention")] if value < floor else []
    if interval is None:
        why = "no per-item results to build an interval from; gate it without confidence"
        return [Failure(name, value, floor, why)]
    low, high = interval
    side, bound = ("lower", low) if b.strict else ("upper", high)
    if bound >= floor:
        return []
    level = f"{b.confidence:.0%}"
    return [Failure(name, value, floor, f"{level} {side} bound {bound:.4f} below min_retention",
                    interval)]  # fmt: skip
