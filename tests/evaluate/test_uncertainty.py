"""Intervals, McNemar and the MDE on synthetic oracles whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knowpress.evaluate.uncertainty import (
    STATISTICS,
    bootstrap,
    clopper_pearson,
    mcnemar,
    mde_binary,
    mde_continuous,
)

TRIALS = 1000  # seeded datasets per coverage oracle


def _coverage(draw: object, truth: float, **kwargs: object) -> float:
    hits = 0
    for seed in range(TRIALS):
        columns, reference = draw(np.random.default_rng(seed))  # type: ignore[operator]
        interval = bootstrap("accuracy", columns, reference, resamples=1000, **kwargs)  # type: ignore[arg-type]
        hits += interval.low <= truth <= interval.high
    return hits / TRIALS


def test_the_interval_of_a_known_accuracy_covers_it_95_percent_of_the_time() -> None:
    def draw(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], None]:
        return {"correct": (rng.random(200) < 0.7).astype(float)}, None

    # 1,000 seeded datasets: the binomial sd of the coverage is 0.007, so this band is ~3 sd
    assert 0.93 <= _coverage(draw, 0.7) <= 0.97


def test_the_paired_retention_interval_covers_the_true_retention() -> None:
    """Reference right on 80% of items; the model loses 10% of those and gains 20% of the
    rest, so its true retention is (0.8 * 0.9 + 0.2 * 0.2) / 0.8 = 0.95."""

    def draw(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        ref = rng.random(300) < 0.8
        flip = rng.random(300)
        model = np.where(ref, flip >= 0.1, flip < 0.2)
        return {"correct": model.astype(float)}, {"correct": ref.astype(float)}

    assert 0.93 <= _coverage(draw, 0.95) <= 0.97


def test_pairing_narrows_the_interval_to_what_the_two_models_disagree_on() -> None:
    rng = np.random.default_rng(1)
    ref = (rng.random(400) < 0.6).astype(float)
    same = bootstrap("accuracy", {"correct": ref}, {"correct": ref})
    assert same is not None and (same.point, same.low, same.high) == (1.0, 1.0, 1.0)
    model = ref.copy()
    model[np.flatnonzero(ref)[:12]] = 0.0  # 12 items lost, nothing else changes
    paired = bootstrap("accuracy", {"correct": model}, {"correct": ref})
    alone = bootstrap("accuracy", {"correct": model})
    assert paired is not None and alone is not None
    assert paired.high <= 1.0 and paired.point < 1.0
    assert paired.high - paired.low < (alone.high - alone.low) / alone.point  # narrower


def test_intervals_are_seeded_and_lower_is_better_inverts() -> None:
    rng = np.random.default_rng(2)
    nats, tokens = rng.gamma(2.0, 5.0, 50), rng.integers(5, 20, 50).astype(float)
    worse = {"nats": nats * 1.1, "tokens": tokens}
    ref = {"nats": nats, "tokens": tokens}
    a = bootstrap("perplexity", worse, ref, higher_is_better=False)
    b = bootstrap("perplexity", worse, ref, higher_is_better=False)
    assert a == b and a is not None
    expected = math.exp(nats.sum() / tokens.sum()) / math.exp(1.1 * nats.sum() / tokens.sum())
    assert a.point == pytest.approx(expected) and a.low <= a.point <= a.high < 1


def test_groups_are_resampled_within_themselves() -> None:
    """long_context: a group that is all wrong stays all wrong in every resample, so the
    stratified mean never moves from it."""
    columns = {"correct": [1.0] * 10 + [0.0] * 10, "group": [0.0] * 10 + [1.0] * 10}
    interval = bootstrap("stratified_accuracy", columns)
    assert interval is not None and (interval.low, interval.high) == (0.5, 0.5)
    plain = bootstrap("accuracy", {"correct": columns["correct"]})
    assert plain is not None and plain.low < 0.5 < plain.high


def test_no_items_or_mismatched_items_give_no_interval() -> None:
    assert bootstrap("accuracy", {"correct": []}) is None
    assert bootstrap("accuracy", {"correct": [1.0, 0.0]}, {"correct": [1.0, 1.0, 0.0]}) is None
    assert bootstrap("accuracy", {"correct": [1.0]}, {"correct": [0.0]}) is None  # ref 0


def test_mcnemar_is_the_exact_binomial_test() -> None:
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(5, 5) == pytest.approx(1.0)
    assert mcnemar(10, 0) == pytest.approx(2 * 0.5**10)  # all ten discordant pairs one way
    assert mcnemar(7, 1) == pytest.approx(2 * sum(math.comb(8, k) for k in (7, 8)) / 2**8)


def test_clopper_pearson_of_no_flips_is_not_empty() -> None:
    low, high = clopper_pearson(0, 100)  # type: ignore[misc]
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 100))
    assert clopper_pearson(0, 0) is None


def test_mde_solves_connors_formula_and_shrinks_with_items() -> None:
    za, zb = 1.959963984540054, 0.8416212335729143
    for n, discordant in [(100, 0.0), (400, 0.1), (1000, 0.3)]:
        d = mde_binary(n, discordant, 1.0)
        assert d is not None
        share = max(discordant, d)
        lhs, rhs = math.sqrt(n) * d, za * math.sqrt(share) + zb * math.sqrt(share - d * d)
        assert lhs == pytest.approx(rhs, rel=1e-6)  # the smallest d that satisfies it
    assert mde_binary(1000, 0.0, 1.0) < mde_binary(100, 0.0, 1.0)  # type: ignore[operator]
    assert mde_binary(100, 0.0, 0.5) == pytest.approx(2 * mde_binary(100, 0.0, 1.0))  # type: ignore[operator]
    assert mde_binary(1, 0.0, 1.0) is None  # one item detects nothing
    assert mde_continuous(0.01) == pytest.approx((za + zb) * 0.01)
    assert mde_continuous(0.0) is None


def test_every_statistic_reads_its_columns() -> None:
    columns = {
        "correct": np.array([[1.0, 0.0]]), "group": np.array([[0.0, 1.0]]),
        "nats": np.array([[2.0, 2.0]]), "tokens": np.array([[2.0, 2.0]]),
        "kl_sum": np.array([[1.0, 3.0]]), "positions": np.array([[2.0, 2.0]]),
        "top1_hits": np.array([[2.0, 1.0]]), "num": np.array([[1.0, 0.0]]),
        "den": np.array([[4.0, 4.0]]), "loss": np.array([[0.0, 0.0]]),
        "count": np.array([[10.0, 5.0]]), "log2_pool": np.array([[2.0, 3.0]]),
    }  # fmt: skip
    strata = [slice(0, 1), slice(1, 2)]
    expected = {"accuracy": 0.5, "stratified_accuracy": 0.5, "perplexity": math.e, "kl": 1.0,
                "top1": 0.75, "share": 0.125, "bits": 10 * 2 + 5 * 3}  # fmt: skip
    assert set(expected) == set(STATISTICS)
    for name, value in expected.items():
        assert float(STATISTICS[name](columns, strata)[0]) == pytest.approx(value), name
