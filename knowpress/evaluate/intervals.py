"""A report row's uncertainty, from the items its measurement kept (``uncertainty.py`` has
the statistics and their formulas).

An items record is ``{"statistic": name, "columns": {column: [one value per item]}}``
(``TaskScore.items`` / ``.statistic``; the report keeps it per row in ``row["items"]`` so
``compress check`` can recompute intervals at any confidence). Per task this gives:

- ``intervals[task]``: ``score`` (the score's own interval), ``retention`` (paired with the
  reference row's items; relative tasks only), ``mde`` (the smallest retention drop the item
  count detects), and for ``kl`` ``top1`` (its agreement's interval);
- ``paired[task]`` (tasks with per-item correctness, and ``kl``'s flips on text): ``n``,
  ``lost`` / ``gained`` counts and shares with their intervals, and the exact McNemar
  ``p`` (QA tasks; none for ``kl``, whose tokens are not independent items: its flip
  intervals come from the bootstrap over sequences instead).
"""

from __future__ import annotations

from typing import Any

from knowpress.evaluate.uncertainty import (
    BINARY,
    CONFIDENCE,
    Interval,
    bootstrap,
    clopper_pearson,
    mcnemar,
    mde_binary,
    mde_continuous,
)

Record = dict[str, Any]


def record_of(score: Any) -> Record | None:
    """The items record of a ``TaskScore`` (None when it kept no items)."""
    if not score.items or score.statistic is None:
        return None
    return {"statistic": score.statistic, "columns": score.items}


def score_interval(record: Record | None, confidence: float = CONFIDENCE) -> Interval | None:
    if record is None:
        return None
    return bootstrap(record["statistic"], record["columns"], confidence=confidence)


def retention_interval(
    record: Record | None, reference: Record | None, higher_is_better: bool,
    confidence: float = CONFIDENCE,
) -> Interval | None:  # fmt: skip
    """The paired bootstrap interval of retention (None without items on both sides)."""
    if record is None or reference is None or record["statistic"] != reference["statistic"]:
        return None
    return bootstrap(
        record["statistic"], record["columns"], reference["columns"], higher_is_better,
        confidence,
    )  # fmt: skip


def top1_interval(record: Record | None, confidence: float = CONFIDENCE) -> Interval | None:
    """``kl``'s top-1 agreement interval (over the same resampled sequences as its KL)."""
    if record is None or "top1_hits" not in record["columns"]:
        return None
    return bootstrap("top1", record["columns"], confidence=confidence)


def task_intervals(
    record: Record | None, reference: Record | None, info: dict[str, Any],
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:  # fmt: skip
    """``{"score", "retention", "mde"}`` (+ ``top1`` for kl) of one task on one row."""
    score = score_interval(record, confidence)
    out: dict[str, Any] = {"score": score.bounds() if score else None}
    if info.get("relative", True):
        kept = retention_interval(record, reference, info["higher_is_better"], confidence)
        out["retention"] = kept.bounds() if kept else None
        out["mde"] = mde(record, reference, kept)
    top1 = top1_interval(record, confidence)
    if top1 is not None:
        out["top1"] = top1.bounds()
    return out


def mde(record: Record | None, reference: Record | None, kept: Interval | None) -> float | None:
    """Binary items: McNemar/Connor MDE at this row's discordance; else from the paired
    bootstrap's standard error (see ``uncertainty``)."""
    if record is None or reference is None:
        return None
    if record["statistic"] in BINARY and _same_length(record, reference, "correct"):
        mine, theirs = record["columns"]["correct"], reference["columns"]["correct"]
        n = len(mine)
        discordant = sum(1 for a, b in zip(mine, theirs, strict=True) if bool(a) != bool(b))
        return mde_binary(n, discordant / n, sum(theirs) / n)
    return None if kept is None else mde_continuous(kept.se)


def _same_length(record: Record, reference: Record, column: str) -> bool:
    mine, theirs = record["columns"].get(column), reference["columns"].get(column)
    return mine is not None and theirs is not None and len(mine) == len(theirs) > 0


def task_paired(
    record: Record | None, reference: Record | None, confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """Flips with intervals and McNemar's p (see the module doc); None without items."""
    if record is None:
        return None
    columns = record["columns"]
    if {"lost", "gained", "text_positions"} <= columns.keys():  # kl: flips on text tokens
        return _text_flips(record, confidence)
    if reference is None or record["statistic"] not in BINARY:
        return None
    if not _same_length(record, reference, "correct"):
        return None
    mine, theirs = columns["correct"], reference["columns"]["correct"]
    n = len(mine)
    lost = sum(1 for a, b in zip(mine, theirs, strict=True) if b and not a)
    gained = sum(1 for a, b in zip(mine, theirs, strict=True) if a and not b)
    return {
        "n": n, "lost": lost, "gained": gained, "lost_share": lost / n,
        "gained_share": gained / n, "lost_interval": clopper_pearson(lost, n, confidence),
        "gained_interval": clopper_pearson(gained, n, confidence),
        "mcnemar_p": mcnemar(lost, gained),
    }  # fmt: skip


def _text_flips(record: Record, confidence: float) -> dict[str, Any] | None:
    columns = record["columns"]
    n = sum(columns["text_positions"])
    if not n:
        return None
    out: dict[str, Any] = {"n": int(n), "unit": "text tokens", "mcnemar_p": None}
    for side in ("lost", "gained"):
        k = sum(columns[side])
        ratio = {"num": columns[side], "den": columns["text_positions"]}
        interval = bootstrap("share", ratio, confidence=confidence)
        out[side], out[f"{side}_share"] = int(k), k / n
        out[f"{side}_interval"] = interval.bounds() if interval else None
    return out


def row_uncertainty(
    items: dict[str, Record | None], reference: dict[str, Record | None],
    tasks: dict[str, dict[str, Any]], confidence: float = CONFIDENCE,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """``(intervals, paired)`` of a row: one entry per task (paired: where there are flips)."""
    intervals, paired = {}, {}
    for task, info in tasks.items():
        record, ref = items.get(task), reference.get(task)
        intervals[task] = task_intervals(record, ref, info, confidence)
        flips = task_paired(record, ref, confidence)
        if flips is not None:
            paired[task] = flips
    return intervals, paired
