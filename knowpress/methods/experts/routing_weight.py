"""Routing-weight baseline: keep the experts with the largest summed combine weight
``Σ_x g_j(x) / N`` (selection frequency weighted by how much each selection counts)."""

from __future__ import annotations

from typing import Literal

import torch

from knowpress.methods.experts.base import EXPERT_PRUNERS, ExpertPruner
from knowpress.methods.experts.stats import ExpertStats


@EXPERT_PRUNERS.register("routing_weight")
class RoutingWeight(ExpertPruner):
    summary = "summed router combine weight on calibration tokens"
    paper = "baseline of Lasby et al. 2025 (REAP), arXiv:2510.13999"
    name: Literal["routing_weight"]

    def scores(self, stats: ExpertStats) -> torch.Tensor:
        return stats.routing_weight
