"""What the gate reads from a report's rows: each gated figure with its interval, MDE and
flips (``checked``), the ``kl`` bounds, and stages flagged as not compressing. The rules are
in ``gate.py``'s module doc."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from knowpress.evaluate.intervals import (
    mde,
    retention_interval,
    score_interval,
    task_paired,
    top1_interval,
)

FIELDS = ("min_retention", "tolerance")


@dataclass(frozen=True)
class Failure:
    task: str
    retention: float
    floor: float
    reason: str
    #: the interval the gate read (with ``confidence``), else None
    interval: list[float] | None = None


@dataclass(frozen=True)
class Bounds:
    """What a gate asks (``confidence`` None: point values); ``fields`` name the thresholds
    in error lines (``--min-retention`` on the command line)."""

    min_retention: float | None = None
    tolerance: float = 0.01
    max_kl: float | None = None
    min_top1: float | None = None
    confidence: float | None = None
    strict: bool = False
    allow_no_compression: bool = False
    fields: tuple[str, str] = FIELDS

    def name(self, key: str) -> str:
        """``max_kl`` as this gate's caller spells it (``--max-kl`` on the command line)."""
        return "--" + key.replace("_", "-") if self.fields[0].startswith("--") else key


def checked_task(report: dict[str, Any], task: str, confidence: float) -> dict[str, Any]:
    """A gated task's retention with its paired interval, MDE and flips (final row)."""
    row, ref = report["rows"][-1], report["rows"][0]
    record = (row.get("items") or {}).get(task)
    reference = (ref.get("items") or {}).get(task)
    higher = report["tasks"].get(task, {}).get("higher_is_better", True)
    kept = retention_interval(record, reference, higher, confidence)
    return {
        "task": task, "measure": "retention", "value": row["retention"].get(task),
        "interval": kept.bounds() if kept else None, "mde": mde(record, reference, kept),
        "flips": task_paired(record, reference, confidence),
    }  # fmt: skip


def checked_kl(row: dict[str, Any], b: Bounds, confidence: float) -> list[dict[str, Any]]:
    """The kl bounds' figures with their intervals (and kl's flips on text), for display."""
    record = (row.get("items") or {}).get("kl")
    if row["scores"].get("kl") is None:
        return []
    out = []
    if b.max_kl is not None:
        kl = score_interval(record, confidence)
        out.append({"task": "kl", "measure": "KL nats/token", "value": row["scores"]["kl"],
                    "interval": kl.bounds() if kl else None, "mde": None,
                    "flips": task_paired(record, None, confidence)})  # fmt: skip
    if b.min_top1 is not None:
        top1 = top1_interval(record, confidence)
        value = ((row.get("details") or {}).get("kl") or {}).get("extra", {}).get("top1")
        out.append({"task": "kl/top1", "measure": "top-1 agreement", "value": value,
                    "interval": top1.bounds() if top1 else None, "mde": None,
                    "flips": None})  # fmt: skip
    return out


def kl_failures(row: dict[str, Any], b: Bounds) -> list[Failure]:
    if b.max_kl is None and b.min_top1 is None:
        return []
    if row["scores"].get("kl") is None:
        return [Failure("kl", math.nan, b.max_kl or b.min_top1 or 0.0, "task not in this row")]
    record = (row.get("items") or {}).get("kl")
    conf = b.confidence
    failures = []
    if b.max_kl is not None:
        interval = score_interval(record, conf) if conf is not None else None
        failures += _bounded("kl", row["scores"]["kl"], interval, b.max_kl, True, b)
    if b.min_top1 is not None:
        detail = (row.get("details") or {}).get("kl") or {}
        top1 = detail.get("extra", {}).get("top1", math.nan)
        interval = top1_interval(record, conf) if conf is not None else None
        failures += _bounded("kl/top1", top1, interval, b.min_top1, False, b)
    return failures


def _bounded(
    task: str, value: float | None, interval: Any, limit: float, is_max: bool, b: Bounds
) -> list[Failure]:
    """``value <= limit`` (``is_max``) or ``>=``; with ``confidence``, on the interval's bound
    (module doc)."""
    label = "max_kl" if is_max else "min_top1"
    value = math.nan if value is None else value
    if b.confidence is None:
        holds = value <= limit if is_max else value >= limit
        return (
            []
            if holds
            else [Failure(task, value, limit, f"{'above' if is_max else 'below'} {label}")]
        )
    if interval is None:
        return [Failure(task, value, limit, "no per-item results to build an interval from")]
    low, high = interval.low, interval.high
    side, bound = (
        (("upper", high) if b.strict else ("lower", low))
        if is_max
        else (("lower", low) if b.strict else ("upper", high))
    )
    holds = bound <= limit if is_max else bound >= limit
    if holds:
        return []
    where = "above" if is_max else "below"
    reason = f"{b.confidence:.0%} {side} bound {bound:.4f} {where} {label}"
    return [Failure(task, value, limit, reason, interval.bounds())]


def compression_failures(report: dict[str, Any], allow: bool) -> list[Failure]:
    """One failure per stage row flagged as not compressing (``shrinkage.py``)."""
    if allow:
        return []
    failures = []
    for row in report["rows"][1:]:
        compression = row.get("compression") or {}
        if compression.get("flag"):
            reason = (
                f"did not compress ({compression['flag']}): {compression.get('note')}; set "
                f"gate.allow_no_compression (--allow-no-compression) if that is intended"
            )
            failures.append(Failure(row["name"], math.nan, math.nan, reason))
    return failures
