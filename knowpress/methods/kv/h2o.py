"""``h2o``: heavy hitters + a recent window (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", arXiv:2306.14048).

Each KV head of each layer accumulates, for every cached token, the attention it received
from every query so far (``A_j = Σ_queries softmax(q·kᵀ)_j``, summed over the query heads
sharing the KV head; queries recomputed from the hooked attention inputs on torch, read
from the graph's outputs on onnxruntime, ``attention.py``). After every forward the head
keeps its last ``⌈recent · budget⌉`` tokens and fills the rest of its ``budget`` with the
others of largest ``A`` (the heavy hitters); the rest is evicted, so the cache holds
``budget`` tokens per head.

```yaml
runtime policy: {name: h2o, budget: 128, recent: 0.5}
```
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from knowpress.methods.kv.attention import attend
from knowpress.methods.kv.base import KV_POLICIES, EvictionPolicy
from knowpress.methods.kv.evicting import EvictingLayer


class H2OLayer(EvictingLayer):
    per_token = ("pos", "score")

    def __init__(self, budget: int | float, recent: float) -> None:
        super().__init__(budget)
        self.recent = recent
        self.score: torch.Tensor | None = None  # [B, H, S] accumulated attention

    def observe(self, pos: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor) -> None:
        assert self.owner is not None
        states, scaling = self.owner.queries(self.index, keys.shape[1])
        q = states.shape[3]
        query_valid = valid[:, 0, -q:]
        probs = attend(states, scaling, keys, pos[:, 0, -q:], pos, valid)
        added = (probs * query_valid[:, None, :, None]).sum(2)  # [B, H, S]
        old = self.score if self.score is not None else added.new_zeros(*added.shape[:2], 0)
        grown = torch.cat([old, old.new_zeros(*old.shape[:2], added.shape[-1] - old.shape[-1])], -1)
        self.score = grown + added

    def priority(self, pos: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:  # fmt: skip
        assert self.score is not None
        rank = valid.long().cumsum(-1) - 1
        window = math.ceil(self.recent * self.capacity())
        recent = valid & (rank >= valid.sum(-1, keepdim=True) - window)
        return self.score + 1e9 * recent.float()

    def kept(self, keep: torch.Tensor) -> None:
        assert self.score is not None
        self.score = self.score.gather(-1, keep)

    def reset(self) -> None:
        super().reset()
        self.score = None


@KV_POLICIES.register("h2o")
class H2OPolicy(EvictionPolicy):
    summary = "accumulated-attention heavy hitters + recent window, per KV head"
    paper = "Zhang et al. 2023 (H2O), arXiv:2306.14048"

    attention = True
    layer_class = H2OLayer
    name: Literal["h2o"]
    recent: float = Field(0.5, ge=0, le=1, description="share of the budget for recent tokens")

    def layer_args(self) -> tuple[Any, ...]:
        return (self.budget, self.recent)
