"""Expert statistics from hooks on calibration data, one ``ExpertStats`` per MoE block.

For a block with ``E`` experts seeing ``N`` calibration tokens ``x``, with combine weights
``g_j(x)`` (the router's top-k weights as the model uses them: softmax, renormalised over
the top-k when the model does so; 0 when ``j`` is not chosen) and expert outputs
``f_j(x)`` (``arch/moe.py``)::

    frequency_j      = |{x : j ∈ topk(x)}| / N
    routing_weight_j = Σ_x g_j(x) / N
    reap_j           = mean over x routed to j of g_j(x)·‖f_j(x)‖₂      (REAP saliency)
    similarity_ij    = mean over probe tokens of cos(f_i(x), f_j(x))    [E, E]

(Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning", arXiv:2510.13999.)
``similarity`` runs every expert on the first ``probe_tokens`` tokens of the block (the
merge baseline and the redundancy pre-check read it). Experts that fewer than
``min_tokens`` tokens reached are ``flagged``: their scores rest on too little data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from knowpress.arch.moe import MoEBlock, moe_blocks
from knowpress.arch.sequential import Onload, moe_inputs


@dataclass
class ExpertStats:
    layer: int
    tokens: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [E] tokens routed
    weight_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [E] Σ g_j
    saliency_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [E] Σ g‖f‖
    cosine_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [E, E]
    probed: int = 0  # tokens behind cosine_sum

    @property
    def frequency(self) -> torch.Tensor:
        return self.counts / max(1, self.tokens)

    @property
    def routing_weight(self) -> torch.Tensor:
        return self.weight_sum / max(1, self.tokens)

    @property
    def reap(self) -> torch.Tensor:
        return self.saliency_sum / self.counts.clamp_min(1)

    @property
    def similarity(self) -> torch.Tensor:
        return self.cosine_sum / max(1, self.probed)

    def flagged(self, min_tokens: int) -> list[int]:
        return [j for j, n in enumerate(self.counts.tolist()) if n < min_tokens]

    def summary(self, min_tokens: int) -> dict[str, Any]:
        """JSON-ready per-expert figures (rounded) for the stage's details."""

        def r(t: torch.Tensor) -> list[float]:
            return [round(float(v), 5) for v in t]

        return {"layer": self.layer, "tokens": self.tokens, "counts": self.counts.int().tolist(),
                "frequency": r(self.frequency), "routing_weight": r(self.routing_weight),
                "reap": r(self.reap), "flagged": self.flagged(min_tokens)}  # fmt: skip


@torch.no_grad()
def _accumulate(block: MoEBlock, stats: ExpertStats, x: torch.Tensor, probe_tokens: int) -> None:
    """Add the tokens ``x [N, H]`` one forward pass sends through ``block``."""
    x = x.detach().float()
    routing = block.route(x)
    e = block.num_experts
    if stats.counts.numel() == 0:
        zeros = torch.zeros(e, dtype=torch.float64)
        stats.counts, stats.weight_sum, stats.saliency_sum = zeros, zeros.clone(), zeros.clone()
        stats.cosine_sum = torch.zeros(e, e, dtype=torch.float64)
    stats.tokens += x.shape[0]
    for j in torch.unique(routing.index).tolist():
        rows, slot = torch.where(routing.index == j)
        g = routing.weight[rows, slot]
        norm = block.expert_output(j, x[rows]).norm(dim=-1)
        stats.counts[j] += rows.numel()
        stats.weight_sum[j] += float(g.sum())
        stats.saliency_sum[j] += float((g * norm).sum())
    take = min(x.shape[0], probe_tokens - stats.probed)
    if take > 0:
        outs = torch.stack([block.expert_output(j, x[:take]) for j in range(e)])  # [E, n, H]
        unit = nn.functional.normalize(outs, dim=-1)
        stats.cosine_sum += torch.einsum("inh,jnh->ij", unit, unit).double().cpu()
        stats.probed += take


@torch.no_grad()
def expert_stats(model: nn.Module, batches: list[torch.Tensor], probe_tokens: int = 512,
                 onload: Onload | None = None) -> list[ExpertStats]:  # fmt: skip
    """Statistics of every MoE block of ``model`` over ``batches`` (token ids ``[B, T]``,
    unpadded), in ``moe_blocks`` order, one decoder block onloaded at a time
    (``arch/sequential.py``; default: where the model is)."""
    onload = onload or Onload(next(model.parameters()).device)
    stats = [ExpertStats(layer=b.layer) for b in moe_blocks(model)]
    for index, block, inputs, _step in moe_inputs(model, batches, onload):
        for x in inputs:  # batch by batch, as the forward passes saw them
            _accumulate(block, stats[index], x, probe_tokens)
    return stats
