"""The gate on intervals (``confidence``, ``strict``), on kl's intervals, and on stages that
did not compress, with synthetic item-level reports: a model with a real drop fails, a
second sample of the same model passes, in 50 seeded repeats."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.gate import check

N = 400


def _row(name: str, correct: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "scores": {"recall": float(correct.mean())},
        "retention": {"recall": float(correct.mean() / reference.mean())},
        "items": {"recall": {"statistic": "accuracy", "columns": {"correct": correct.tolist()}}},
        "details": {},
    }


def _report(reference: np.ndarray, model: np.ndarray) -> dict[str, Any]:
    task = {"metric": "exact_match", "higher_is_better": True, "relative": True,
            "chance": 0.01, "near_chance": False}  # fmt: skip
    rows = [_row("reference", reference, reference), _row("01-quantize", model, reference)]
    return {"schema_version": 3, "inputs": {"world": {"key": "w"}}, "tasks": {"recall": task},
            "rows": rows, "gate": None}  # fmt: skip


def _models(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, a second sample of the same model, a model that lost 20% of the items).

    Each item has a probability of being answered right (0.97 on 80% of them, 0.03 on the
    rest); the reference and the copy are independent draws of it, so the copy's true
    retention is 1 while its items disagree on ~6%. The dropped model draws 0.03 on 20% of
    the items the reference model knows: true retention ~0.78."""
    rng = np.random.default_rng(seed)
    known = rng.random(N) < 0.8
    p = np.where(known, 0.97, 0.03)
    reference = (rng.random(N) < p).astype(float)
    copy = (rng.random(N) < p).astype(float)
    lost = known & (rng.random(N) < 0.2)
    dropped = (rng.random(N) < np.where(lost, 0.03, p)).astype(float)
    return reference, copy, dropped


def test_a_real_drop_fails_and_a_resampled_copy_passes_in_50_seeded_repeats() -> None:
    for seed in range(50):
        reference, copy, dropped = _models(seed)
        same = check(_report(reference, copy), 0.95, confidence=0.95)
        worse = check(_report(reference, dropped), 0.95, confidence=0.95)
        assert same.passed, (seed, same.failures)
        assert not worse.passed, (seed, worse.checked)
        assert "95% upper bound" in worse.failures[0].reason
        low, high = worse.failures[0].interval  # type: ignore[misc]
        assert low <= worse.failures[0].retention <= high < 0.95


def test_the_interval_gate_differs_from_the_point_gate_both_ways() -> None:
    """A small noisy drop: the point is under the floor but the interval reaches over it
    (passes with confidence, fails without); strict needs the lower bound over it."""
    reference = np.array([1.0] * 40 + [0.0] * 10)
    model = reference.copy()
    model[:3] = 0.0  # 3 of 40 lost: retention 0.925
    report = _report(reference, model)
    assert not check(report, 0.95).passed
    loose = check(report, 0.95, confidence=0.95)
    assert loose.passed and loose.checked[0]["interval"][1] >= 0.95
    strict = check(report, 0.9, confidence=0.95, strict=True)
    assert not strict.passed and "95% lower bound" in strict.failures[0].reason
    assert check(report, 0.9).passed  # the point clears 0.9; its lower bound does not


def test_checked_lists_interval_mde_and_mcnemar() -> None:
    reference, _, dropped = _models(0)
    result = check(_report(reference, dropped), 0.5)
    (entry,) = result.checked
    assert entry["task"] == "recall" and entry["measure"] == "retention"
    assert entry["interval"][0] < entry["value"] < entry["interval"][1]
    assert 0 < entry["mde"] < 0.1  # 400 items detect a drop of a few percent
    flips = entry["flips"]
    assert flips["lost"] > flips["gained"] and flips["mcnemar_p"] < 1e-6
    assert result.interval_confidence == 0.95 and result.confidence is None


def _kl_report(kl_per_position: float, top1: float) -> dict[str, Any]:
    positions = [100.0] * 30
    columns = {
        "kl_sum": [kl_per_position * p * (0.5 + (i % 3) / 2) for i, p in enumerate(positions)],
        "positions": positions, "top1_hits": [top1 * p for p in positions],
        "text_positions": positions, "lost": [1.0] * 30, "gained": [0.0] * 30,
    }  # fmt: skip
    kl = sum(columns["kl_sum"]) / sum(positions)
    row = {"name": "01-quantize", "scores": {"kl": kl}, "retention": {},
           "details": {"kl": {"extra": {"top1": top1}}},
           "items": {"kl": {"statistic": "kl", "columns": columns}}}  # fmt: skip
    reference = {"name": "reference", "scores": {"kl": 0.0}, "retention": {}, "items": {}}
    task = {"metric": "kl_nats_per_token", "higher_is_better": False, "relative": False}
    return {"inputs": {"world": {"key": "w"}}, "tasks": {"kl": task},
            "rows": [reference, row], "gate": None}  # fmt: skip


def test_kl_bounds_read_kl_intervals() -> None:
    report = _kl_report(0.05, 0.9)
    kl = report["rows"][1]["scores"]["kl"]
    assert not check(report, None, max_kl=kl * 0.99).passed  # point over the bound
    assert check(report, None, max_kl=kl * 0.99, confidence=0.95).passed  # lower bound under it
    strict = check(report, None, max_kl=kl * 1.01, confidence=0.95, strict=True)
    assert not strict.passed and "upper bound" in strict.failures[0].reason
    assert not check(report, None, max_kl=kl * 0.5, confidence=0.95).passed
    assert check(report, None, min_top1=0.9, confidence=0.95, strict=True).passed  # no spread
    result = check(report, None, max_kl=1.0, min_top1=0.5)
    assert [c["task"] for c in result.checked] == ["kl", "kl/top1"]
    assert result.checked[0]["flips"]["lost"] == 30


def test_a_stage_that_did_not_compress_fails_the_gate_unless_allowed() -> None:
    reference, copy, _ = _models(1)
    report = _report(reference, copy)
    note = "1.65x its input's stored bytes (165 vs 100), the same KV bytes/token"
    report["rows"][1]["compression"] = {"flag": "grew", "note": note}
    result = check(report, 0.5)
    assert not result.passed and result.failures[0].task == "01-quantize"
    assert "did not compress (grew)" in result.failures[0].reason
    assert check(report, 0.5, allow_no_compression=True).passed


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"confidence": 1.0}, "confidence: 1.0 is not a confidence level"),
        ({"confidence": math.nan}, "confidence: nan is not a confidence level"),
        ({"confidence": 0.3}, "is not a confidence level"),
        ({"strict": True}, "strict tests the interval's lower bound: give confidence too"),
        ({"max_kl": 0.1}, "max_kl: the report has no kl task (it scored recall)"),
    ],
)
def test_gate_settings_it_cannot_mean_are_one_line(kwargs: dict[str, Any], expected: str) -> None:
    reference, copy, _ = _models(2)
    with pytest.raises(KnowpressError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check(_report(reference, copy), 0.9, **kwargs)


def test_an_old_report_without_items_cannot_be_gated_on_intervals() -> None:
    reference, copy, _ = _models(3)
    report = _report(reference, copy)
    report["schema_version"] = 2
    for row in report["rows"]:
        del row["items"]
    assert check(report, 0.9).passed  # read as before, on point values
    with pytest.raises(KnowpressError, match="keeps no per-item results"):
        check(report, 0.9, confidence=0.95)
