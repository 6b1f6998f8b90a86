"""Merging baseline: the least-selected experts are folded into their most similar kept
expert instead of dropped. Each kept expert ``k`` with the group ``G_k`` merged into it
becomes the frequency-weighted average of the group's weights::

    W_k ← Σ_{i ∈ {k} ∪ G_k} n_i · W_i / Σ n_i        (n_i: calibration tokens of i)

similarity = mean cosine of expert outputs on probe tokens (``stats.py``); the kept expert's
router row is kept. (HC-SMoE, Chen et al. 2024, arXiv:2410.08589, frequency-weighted; REAP
argues merging leaves an irreducible error, which this baseline lets us measure.)
"""

from __future__ import annotations

from typing import Literal

import torch

from knowpress.arch.moe import MoEBlock, keep_experts
from knowpress.methods.experts.base import EXPERT_PRUNERS, ExpertPruner
from knowpress.methods.experts.stats import ExpertStats


@EXPERT_PRUNERS.register("merge")
class Merge(ExpertPruner):
    summary = "fold the least-selected experts into their most similar kept expert"
    paper = "Chen et al. 2024 (HC-SMoE), arXiv:2410.08589"
    name: Literal["merge"]

    def scores(self, stats: ExpertStats) -> torch.Tensor:
        return stats.frequency

    def apply(self, block: MoEBlock, stats: ExpertStats, keep: list[int]) -> None:
        similarity = stats.similarity.clone()
        dropped = [j for j in range(block.num_experts) if j not in keep]
        groups: dict[int, list[int]] = {k: [k] for k in keep}
        for d in dropped:
            target = keep[int(similarity[d, keep].argmax())]
            groups[target].append(d)
        experts = block.experts
        with torch.no_grad():  # on copies: the model's tensors stay as they were (pre-check)
            for name in ("gate_up_proj", "down_proj"):
                tensor = getattr(experts, name).detach().clone()
                setattr(experts, name, torch.nn.Parameter(tensor))
                for k, members in groups.items():
                    if len(members) == 1:
                        continue
                    # float32 math whatever the compute dtype, rounded once
                    n = stats.counts[members].to(device=tensor.device, dtype=torch.float32)
                    n = n if float(n.sum()) > 0 else torch.ones_like(n)
                    w = (n / n.sum()).view(-1, 1, 1)
                    tensor[k] = (tensor[members].float() * w).sum(0).to(tensor.dtype)
        keep_experts(block, keep)
