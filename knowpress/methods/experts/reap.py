"""REAP: keep the experts with the largest router-weighted output norm over their tokens,
``S_j = mean_{x routed to j} g_j(x)·‖f_j(x)‖₂`` (``stats.py``)."""

from __future__ import annotations

from typing import Literal

import torch

from knowpress.methods.experts.base import EXPERT_PRUNERS, ExpertPruner
from knowpress.methods.experts.stats import ExpertStats


@EXPERT_PRUNERS.register("reap")
class REAP(ExpertPruner):
    summary = "router-weighted expert activation norm (REAP saliency)"
    paper = "Lasby et al. 2025 (REAP), arXiv:2510.13999"
    name: Literal["reap"]

    def scores(self, stats: ExpertStats) -> torch.Tensor:
        return stats.reap
