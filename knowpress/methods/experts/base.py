"""What every expert-pruning method is: a config that scores each block's experts (higher =
keep) from the calibration statistics, and applies the cut (default: drop the rest)."""

from __future__ import annotations

from typing import ClassVar

import torch

from knowpress.arch.moe import MoEBlock, keep_experts
from knowpress.core.config import FrozenConfig
from knowpress.core.registry import Registry
from knowpress.methods.experts.stats import ExpertStats


class ExpertPruner(FrozenConfig):
    name: str
    summary: ClassVar[str] = ""  # shown by `compress list`
    paper: ClassVar[str] = ""

    def scores(self, stats: ExpertStats) -> torch.Tensor:
        """``[E]`` importance of each expert of one block (the lowest are removed)."""
        raise NotImplementedError

    def apply(self, block: MoEBlock, stats: ExpertStats, keep: list[int]) -> None:
        """Cut ``block`` down to experts ``keep`` (ascending ids)."""
        keep_experts(block, keep)


EXPERT_PRUNERS: Registry[type[ExpertPruner]] = Registry("expert pruning method")
