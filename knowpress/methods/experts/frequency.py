"""Frequency baseline: keep the experts the router selects most often (share of tokens)."""

from __future__ import annotations

from typing import Literal

import torch

from knowpress.methods.experts.base import EXPERT_PRUNERS, ExpertPruner
from knowpress.methods.experts.stats import ExpertStats


@EXPERT_PRUNERS.register("frequency")
class Frequency(ExpertPruner):
    summary = "selection frequency on calibration tokens"
    paper = "baseline of Lasby et al. 2025 (REAP), arXiv:2510.13999"
    name: Literal["frequency"]

    def scores(self, stats: ExpertStats) -> torch.Tensor:
        return stats.frequency
