"""The gate: pass when every gated task keeps enough knowledge, so CI can fail a run.

Checks the report's final row (the output of the last stage). A task fails when its
retention is below ``min_retention``, or, with a baseline report, when it dropped more than
``tolerance`` below the baseline's retention for the same task. An undefined retention (NaN:
teacher scored 0) fails: it cannot show that knowledge held. Tasks whose teacher score is
near chance are skipped unless named in ``tasks``: their retention means nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(
    report: dict[str, Any],
    min_retention: float | None,
    tasks: list[str] | None = None,
    baseline: dict[str, Any] | None = None,
    baseline_name: str | None = None,
    tolerance: float = 0.01,
) -> GateResult:
    """Gate the final row of ``report`` (see module docstring)."""
    if min_retention is None and baseline is None:
        raise ValueError("the gate needs min_retention, a baseline report, or both")
    row = report["rows"][-1]
    if tasks:
        names, skipped = list(tasks), []
    else:
        near = {t for t, info in report["tasks"].items() if info.get("near_chance")}
        names = [t for t in row["retention"] if t not in near]
        skipped = [t for t in row["retention"] if t in near]
    failures: list[Failure] = []
    base_row = baseline["rows"][-1] if baseline is not None else None
    for name in names:
        if name not in row["retention"]:
            failures.append(Failure(name, math.nan, min_retention or 0.0, "task not in report"))
            continue
        value = row["retention"][name]
        if value is None or math.isnan(value):
            failures.append(Failure(name, math.nan, min_retention or 0.0, "retention undefined"))
            continue
        if min_retention is not None and value < min_retention:
            failures.append(Failure(name, value, min_retention, "below min_retention"))
        if base_row is not None:
            before = base_row["retention"].get(name)
            if before is None:
                continue
            floor = before - tolerance
            if value < floor:
                failures.append(
                    Failure(name, value, floor, f"regressed from baseline {before:.4f}")
                )
    return GateResult(not failures, row["name"], min_retention, baseline_name, failures, skipped)
