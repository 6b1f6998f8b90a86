"""Redundancy pre-check: how much expert sparsity a model tolerates, measured before pruning.

Safe sparsity depends on the model, not its size (REAP: Qwen3-30B-A3B keeps 99.8% of GSM8K
at 50% pruned, Moonlight-16B falls to 17%). From the statistics and a quick probe:

- ``kl_by_sparsity``: for sparsities ``s`` on a grid (each number of experts removed, or
  eighths for more than 16 experts per block, and the requested one), the
  model is pruned in place with the recipe's own method and budget, its next-token
  distributions on held-out probe sequences compared with the unpruned model's
  (mean token ``KL(p_full ‖ p_pruned)``), then restored exactly;
- ``tolerated_sparsity``: the largest grid sparsity whose KL stays ≤ ``max_kl``;
- ``dropped_saliency_share``: the share of all REAP saliency held by the experts the requested
  sparsity removes, and ``max_similarity``: the mean over blocks of the most similar pair of
  experts' output cosine (duplicate experts make pruning cheap).

The requested sparsity above ``tolerated_sparsity`` is a risk: a warning, or with
``on_risk: fail`` a stop before anything is saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from knowpress.arch.moe import MoEBlock
from knowpress.arch.sequential import Onload, sequential_log_probs
from knowpress.core.config import FrozenConfig
from knowpress.methods.experts.base import ExpertPruner
from knowpress.methods.experts.budget import Budget, keep_for
from knowpress.methods.experts.stats import ExpertStats


class PrecheckSpec(FrozenConfig):
    """``max_kl``: the probe KL (nats per token) a tolerated sparsity may reach."""

    enabled: bool = True
    max_kl: float = Field(0.1, gt=0)
    on_risk: Literal["warn", "fail"] = "warn"
    probe_samples: int = Field(8, ge=1, description="held-out calibration sequences probed")


_SLOTS = ("gate_up_proj", "down_proj")


@contextmanager
def pruned_in_place(blocks: list[MoEBlock], stats: list[ExpertStats], pruner: ExpertPruner,
                    keeps: list[list[int]]) -> Iterator[None]:  # fmt: skip
    """The model with ``keeps`` applied by ``pruner``; the original tensors restored after."""
    saved = []
    for block in blocks:
        router, experts = block.router, block.experts
        saved.append((router.weight, getattr(router, "e_score_correction_bias", None),
                      *(getattr(experts, n) for n in _SLOTS), block.num_experts))  # fmt: skip
    try:
        for block, record, keep in zip(blocks, stats, keeps, strict=True):
            pruner.apply(block, record, keep)
        yield
    finally:
        for block, (weight, bias, gate_up, down, n) in zip(blocks, saved, strict=True):
            block.router.weight = weight
            if bias is not None:
                block.router.e_score_correction_bias = bias
            block.experts.gate_up_proj, block.experts.down_proj = gate_up, down
            block.router.num_experts = block.experts.num_experts = n


def _kl(reference: list[torch.Tensor], pruned: list[torch.Tensor]) -> float:
    pairs = zip(reference, pruned, strict=True)
    total = sum(float((p.exp() * (p - q)).sum(-1).sum()) for p, q in pairs)
    return total / sum(p.shape[0] * p.shape[1] for p in reference)


def _allowed(block: MoEBlock, sparsity: float) -> bool:
    drop = round(sparsity * block.num_experts)
    left = block.num_experts - drop
    return drop > 0 and left >= block.top_k and block.group_problem(left) is None


def grid(blocks: list[MoEBlock], requested: float) -> list[float]:
    """The sparsities probed: each distinct number of experts removed (eighths when a block
    has more than 16) that every block allows, plus ``requested``, ascending."""
    e = min(b.num_experts for b in blocks)
    steps = range(1, e) if e <= 16 else sorted({round(i * e / 8) for i in range(1, 8)})
    points = {round(k / e, 4) for k in steps if all(_allowed(b, k / e) for b in blocks)}
    return sorted(points | {requested})


def precheck(model: nn.Module, blocks: list[MoEBlock], stats: list[ExpertStats],
             pruner: ExpertPruner, budget: Budget, probe: list[torch.Tensor],
             spec: PrecheckSpec, requested: float,
             onload: Onload | None = None) -> dict[str, Any]:  # fmt: skip
    """The estimate (module docstring) for pruning at ``requested`` sparsity; each probe
    forward runs one decoder block at a time (``arch/sequential.py``)."""
    onload = onload or Onload(next(model.parameters()).device)
    reference = sequential_log_probs(model, probe, onload)
    curve: dict[str, float] = {}
    for s in grid(blocks, requested):
        keeps = keep_for(blocks, stats, pruner, s, budget)
        with pruned_in_place(blocks, stats, pruner, keeps):
            curve[f"{s:g}"] = round(_kl(reference, sequential_log_probs(model, probe, onload)), 5)
    tolerated = max([float(s) for s, kl in curve.items() if kl <= spec.max_kl], default=0.0)
    keeps = keep_for(blocks, stats, pruner, requested, budget)
    share = [float(r.reap.sum()) for r in stats]
    lost = [float(r.reap[[j for j in range(r.reap.numel()) if j not in k]].sum())
            for r, k in zip(stats, keeps, strict=True)]  # fmt: skip
    off = [r.similarity - 2 * torch.eye(r.similarity.shape[0], dtype=r.similarity.dtype)
           for r in stats]  # fmt: skip
    return {
        "requested_sparsity": requested,
        "tolerated_sparsity": tolerated,
        "max_kl": spec.max_kl,
        "kl_by_sparsity": curve,
        "dropped_saliency_share": round(sum(lost) / max(sum(share), 1e-30), 5),
        "max_similarity": round(sum(float(o.max()) for o in off) / len(off), 5),
        "risk": requested > tolerated + 1e-9,
    }
