"""How sure a row's figures are: paired bootstrap intervals, exact McNemar tests on flips and
the minimum detectable effect at the item count.

A task leaves per-item numbers (``TaskScore.items``: columns of equal length, one entry per
item, window or text) and names the ``statistic`` that turns them into its score, so a score
is recomputed from any resample of its items. ``statistic(items) == score`` on the items as
they are (tests hold every task to it).

**Intervals** are percentile intervals of a seeded bootstrap (``numpy.random.default_rng(SEED)``,
``RESAMPLES`` resamples): resample the n items with replacement, recompute the statistic,
take the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of the replicates. A column ``group``
makes the resampling stratified: items are drawn within each group, so every group keeps its
size (``long_context``'s haystack sizes, ``bits``' attributes). For **retention** the
bootstrap is *paired*: the same resampled item indices are applied to the reference's items
and to the row's, and each replicate is ``retention(stat(row[idx]), stat(ref[idx]))``
(row / reference, reference / row for lower-is-better scores), so item difficulty cancels
and only disagreement between the two models widens the interval. A replicate whose
reference statistic is 0 has no retention and is left out of the quantiles.

**Flips** (items the reference gets right and the row wrong: ``lost``; the reverse:
``gained``) get exact Clopper-Pearson intervals on ``k / n``, and the exact McNemar test:
two-sided binomial test of ``lost`` successes in ``lost + gained`` discordant pairs at 1/2
(``p = 1`` without discordant pairs).

**Minimum detectable effect** (MDE, retention units, two-sided ``ALPHA``, ``POWER``): for
per-item correctness, Connor's (1987) sample size for McNemar's test solved for the
accuracy drop ``d``: the smallest ``d`` with

    sqrt(n) * d >= z(1 - ALPHA/2) * sqrt(p_d) + z(POWER) * sqrt(p_d - d^2),

``p_d = max(observed discordant share, d)`` (a drop of ``d`` needs at least ``d`` of the items
to flip), divided by the reference's accuracy. For other scores ``(z(1 - ALPHA/2) + z(POWER))
* se``, ``se`` the standard deviation of the paired bootstrap's retention replicates (none
when they do not vary: the reference row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
_CHUNK = 250  # replicates drawn at once (bounds the index matrix: _CHUNK x n)
BINARY = ("accuracy", "stratified_accuracy")  # statistics over per-item correctness

Columns = Mapping[str, np.ndarray]
Strata = list[slice]


def _accuracy(c: Columns, strata: Strata) -> np.ndarray:
    """Mean of ``correct``: exact match over the items."""
    return c["correct"].mean(-1)


def _stratified_accuracy(c: Columns, strata: Strata) -> np.ndarray:
    """Mean over groups of each group's mean ``correct`` (``long_context``: per size)."""
    return np.mean([c["correct"][..., s].mean(-1) for s in strata], axis=0)


def _perplexity(c: Columns, strata: Strata) -> np.ndarray:
    """``exp(sum nats / sum tokens)`` over the texts."""
    return np.exp(c["nats"].sum(-1) / c["tokens"].sum(-1))


def _kl(c: Columns, strata: Strata) -> np.ndarray:
    """Mean KL per position: ``sum kl_sum / sum positions`` over the sequences."""
    return c["kl_sum"].sum(-1) / c["positions"].sum(-1)


def _top1(c: Columns, strata: Strata) -> np.ndarray:
    """Top-1 agreement: ``sum top1_hits / sum positions``."""
    return c["top1_hits"].sum(-1) / c["positions"].sum(-1)


def _share(c: Columns, strata: Strata) -> np.ndarray:
    """``sum num / sum den`` (``kl``'s flips on text: flipped tokens over text tokens)."""
    return c["num"].sum(-1) / c["den"].sum(-1)


def _bits(c: Columns, strata: Strata) -> np.ndarray:
    """``sum_a count_a * max(0, log2_pool_a - mean(loss in a) / ln 2)`` over attribute groups
    (``count``, ``log2_pool`` repeat the attribute's constants on each of its items)."""
    total = 0.0
    for s in strata:
        first = s.start
        mean = c["loss"][..., s].mean(-1)
        room = np.maximum(0.0, c["log2_pool"][..., first] - mean / math.log(2))
        total = total + c["count"][..., first] * room
    return np.asarray(total)


STATISTICS: dict[str, Callable[[Columns, Strata], np.ndarray]] = {
    "accuracy": _accuracy,
    "stratified_accuracy": _stratified_accuracy,
    "perplexity": _perplexity,
    "kl": _kl,
    "top1": _top1,
    "share": _share,
    "bits": _bits,
}


#: the columns each statistic reads (a report's items are checked against them on load)
COLUMNS: dict[str, tuple[str, ...]] = {
    "accuracy": ("correct",),
    "stratified_accuracy": ("correct", "group"),
    "perplexity": ("nats", "tokens"),
    "kl": ("kl_sum", "positions"),
    "top1": ("top1_hits", "positions"),
    "share": ("num", "den"),
    "bits": ("loss", "group", "count", "log2_pool"),
}


@dataclass(frozen=True)
class Interval:
    """``low``/``high`` at ``confidence``; ``se`` the replicates' standard deviation."""

    point: float
    low: float
    high: float
    se: float

    def bounds(self) -> list[float]:
        return [self.low, self.high]


def _sorted(columns: Mapping[str, Sequence[float]]) -> tuple[dict[str, np.ndarray], Strata]:
    """Columns as float arrays ordered by ``group`` (stable), and each group's slice."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    n = len(next(iter(arrays.values())))
    if any(len(a) != n for a in arrays.values()):
        raise ValueError("item columns differ in length")
    group = arrays.get("group")
    if group is None:
        return arrays, [slice(0, n)]
    order = np.argsort(group, kind="stable")
    arrays = {k: a[order] for k, a in arrays.items()}
    starts = np.flatnonzero(np.r_[True, np.diff(arrays["group"]) != 0])
    ends = np.r_[starts[1:], n]
    return arrays, [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _indices(strata: Strata, resamples: int, seed: int) -> list[np.ndarray]:
    """Chunks of resampled indices ``[b, n]``, drawn within each stratum."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        parts = [rng.integers(s.start, s.stop, size=(b, s.stop - s.start)) for s in strata]
        chunks.append(np.concatenate(parts, axis=1))
    return chunks


def _ratio(value: np.ndarray, reference: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Retention, NaN where it is undefined (see ``tasks.base.retention``)."""
    num, den = (value, reference) if higher_is_better else (reference, value)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap(
    statistic: str,
    columns: Mapping[str, Sequence[float]],
    reference: Mapping[str, Sequence[float]] | None = None,
    higher_is_better: bool = True,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """The percentile interval of ``statistic`` over ``columns`` or, with ``reference``
    (the reference's items, same order), of the paired retention (see the module doc).
    None when there are no items, the two differ in items, or the point value is undefined."""
    fn = STATISTICS[statistic]
    if not columns or not len(next(iter(columns.values()))):
        return None
    cols, strata = _sorted(columns)
    ref = None
    if reference is not None:
        ref, ref_strata = _sorted(reference)
        same_groups = np.array_equal(cols.get("group", 0), ref.get("group", 0))
        if ref_strata != strata or not same_groups:
            return None

    def value(idx: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            mine = fn({k: a[idx] for k, a in cols.items()}, strata)
            if ref is None:
                return mine
            theirs = fn({k: a[idx] for k, a in ref.items()}, strata)
        return _ratio(mine, theirs, higher_is_better)

    point = float(value(np.arange(strata[-1].stop)[None])[0])
    if not math.isfinite(point):
        return None
    reps = np.concatenate([value(idx) for idx in _indices(strata, resamples, seed)])
    reps = reps[np.isfinite(reps)]
    low, high = np.quantile(reps, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(point, float(low), float(high), float(reps.std(ddof=1)))


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """Exact binomial interval of ``k / n`` (None without items)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def mcnemar(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value: ``lost`` of ``lost + gained`` discordant pairs at 1/2."""
    if lost + gained == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(lost, lost + gained, 0.5).pvalue)


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def mde_binary(
    n: int, discordant: float, reference_accuracy: float, alpha: float = ALPHA,
    power: float = POWER,
) -> float | None:  # fmt: skip
    """Smallest retention drop McNemar's test detects (module doc: Connor's formula solved
    for ``d``, divided by the reference's accuracy); None when not even ``d = 1`` is."""
    if n <= 0 or reference_accuracy <= 0:
        return None
    za, zb = _z(1 - alpha / 2), _z(power)

    def enough(d: float) -> bool:
        share = max(discordant, d)
        return math.sqrt(n) * d >= za * math.sqrt(share) + zb * math.sqrt(max(share - d * d, 0))

    grid = np.linspace(1e-4, 1.0, 2000)
    hits = [d for d in grid if enough(float(d))]
    if not hits:
        return None
    high = float(hits[0])
    low = max(high - float(grid[1] - grid[0]), 0.0)
    for _ in range(40):  # bisect between the last grid point that fails and the first that holds
        mid = (low + high) / 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high / reference_accuracy


def mde_continuous(se: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """``(z(1 - alpha/2) + z(power)) * se`` (None when the replicates do not vary)."""
    if not (math.isfinite(se) and se > 0):
        return None
    return (_z(1 - alpha / 2) + _z(power)) * se
