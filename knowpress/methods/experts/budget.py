"""Which experts a sparsity removes: the lowest-scored of each block (``per_layer``: every
block loses ``round(s·E)``, so the count stays uniform and stock transformers loads the
result), or the lowest across blocks (``global``: scores divided by their block's mean so
blocks compare, never leaving a block fewer than its top-k; counts become uneven)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from knowpress.core.errors import KnowpressError

if TYPE_CHECKING:
    from knowpress.arch.moe import MoEBlock
    from knowpress.methods.experts.base import ExpertPruner
    from knowpress.methods.experts.stats import ExpertStats

Budget = Literal["per_layer", "global"]


def _ranked(scores: torch.Tensor) -> list[int]:
    """Expert ids from least to most important (ties: the higher id goes first)."""
    order = sorted(range(scores.numel()), key=lambda j: (float(scores[j]), -j))
    return order


def choose_keep(scores: list[torch.Tensor], top_k: list[int], sparsity: float,
                budget: Budget, groups: list[int] | None = None) -> list[list[int]]:  # fmt: skip
    """Per block, the ascending ids of the experts kept; ``groups``: a grouped router's
    group count per block (its contiguous groups each lose the same number, per layer)."""
    counts = [s.numel() for s in scores]
    if budget == "per_layer":
        keeps = []
        for i, (s, k) in enumerate(zip(scores, top_k, strict=True)):
            drop = round(sparsity * s.numel())
            if s.numel() - drop < k:
                raise KnowpressError(
                    f"sparsity {sparsity}: MoE block {i} would keep {s.numel() - drop} of "
                    f"{s.numel()} experts, fewer than its top-k ({k}); lower the sparsity"
                )
            g = (groups or [1] * len(scores))[i]
            if drop % g:
                raise KnowpressError(
                    f"sparsity {sparsity}: MoE block {i} would lose {drop} experts, which its "
                    f"{g} router groups cannot lose evenly; remove a multiple of {g}"
                )
            size = s.numel() // g
            kept = [g0 * size + j for g0 in range(g)
                    for j in _ranked(s[g0 * size : (g0 + 1) * size])[drop // g :]]  # fmt: skip
            keeps.append(sorted(kept))
        return keeps
    total = round(sparsity * sum(counts))
    room = sum(c - k for c, k in zip(counts, top_k, strict=True))
    if total > room:
        raise KnowpressError(
            f"sparsity {sparsity}: removing {total} experts leaves some block fewer than its "
            f"top-k (at most {room} can go); lower the sparsity"
        )
    pool = [(float(s[j]) / max(float(s.mean()), 1e-30), i, j)
            for i, s in enumerate(scores) for j in range(s.numel())]  # fmt: skip
    pool.sort(key=lambda t: (t[0], -t[2]))
    dropped: list[set[int]] = [set() for _ in scores]
    for _, i, j in pool:
        if total == 0:
            break
        if counts[i] - len(dropped[i]) > top_k[i]:
            dropped[i].add(j)
            total -= 1
    return [[j for j in range(c) if j not in d] for c, d in zip(counts, dropped, strict=True)]


def keep_for(blocks: list[MoEBlock], stats: list[ExpertStats], method: ExpertPruner,
             sparsity: float, budget: Budget) -> list[list[int]]:  # fmt: skip
    """``choose_keep`` on ``method``'s scores with each block's top-k and router groups."""
    return choose_keep([method.scores(s) for s in stats], [b.top_k for b in blocks], sparsity,
                       budget, [b.groups for b in blocks])  # fmt: skip


def prune_blocks(model: Any, blocks: list[MoEBlock], stats: list[ExpertStats],
                 method: ExpertPruner, sparsity: float,
                 budget: Budget) -> tuple[list[list[int]], dict[str, Any]]:  # fmt: skip
    """Cut every block of ``model`` to what ``keep_for`` keeps (``method.apply``) and record
    the counts in its config; the kept ids per block and the manifest structure."""
    from knowpress.arch.moe import set_expert_counts

    keeps = keep_for(blocks, stats, method, sparsity, budget)
    for block, record, keep in zip(blocks, stats, keeps, strict=True):
        method.apply(block, record, keep)
    return keeps, set_expert_counts(model, [len(k) for k in keeps])
