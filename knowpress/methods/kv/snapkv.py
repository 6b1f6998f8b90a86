"""``snapkv``: observation-window votes, pooled, per KV head (Li et al. 2024, "SnapKV: LLM
Knows What You are Looking for Before Generation", arXiv:2404.14469).

The last ``window`` queries vote for the tokens before them: for KV head h,
``v_j = Σ_{queries i in the window} Σ_{query heads of h} softmax(q_i·kᵀ · scaling)_j``;
votes are pooled along the head's real tokens (``max`` or ``avg``, kernel ``kernel``,
stride 1; padding taken out first) so a kept token brings its neighbours; each head keeps
the window itself plus the ``budget − window`` tokens of largest pooled vote. Queries are
recomputed from the hooked attention inputs on torch (the model keeps its sdpa attention)
and read from the exported graph's outputs on onnxruntime (``attention.py``).

SnapKV compresses the prompt once, its question being the window; here the window slides
(the last ``window`` queries seen, kept per layer: ``[B, H_kv, G, window, D]``), so decoding
keeps the cache at ``budget`` tokens with the same rule. Evaluated with a context/question
split, the context is compressed before the question is read (query-agnostic, as kvpress
scores it); a whole-prompt prefill lets the question pick what the context keeps.

```yaml
runtime policy: {name: snapkv, budget: 0.25, window: 16, kernel: 7, pooling: max}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from knowpress.methods.kv.attention import attend
from knowpress.methods.kv.base import KV_POLICIES, EvictionPolicy
from knowpress.methods.kv.evicting import EvictingLayer


def pool(votes: torch.Tensor, valid: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """``votes [B, H, S]`` pooled along each head's real tokens in order (stride 1, ``kernel``
    wide, centred): pads are taken out first, so a token's neighbours are the real tokens
    beside it whatever padding a batch puts between them (a context, then a left-padded
    question). Pads get -inf."""
    order = (~valid).long().argsort(dim=-1, stable=True)  # real tokens first, in slot order
    real = valid.gather(-1, order).float()
    flat = votes.gather(-1, order) * real
    b, h, s = flat.shape
    pad = kernel // 2
    if how == "max":
        shown = flat.masked_fill(real == 0, float("-inf")).reshape(b * h, 1, s)
        pooled = F.max_pool1d(shown, kernel, stride=1, padding=pad)[..., :s]
    else:  # the mean over the real tokens in the window
        total = F.avg_pool1d(flat.reshape(b * h, 1, s), kernel, stride=1, padding=pad)[..., :s]
        count = F.avg_pool1d(real.reshape(b * h, 1, s), kernel, stride=1, padding=pad)[..., :s]
        pooled = total / count.clamp_min(1e-12)
    pooled = pooled.reshape(b, h, s).masked_fill(real == 0, float("-inf"))
    return torch.empty_like(pooled).scatter(-1, order, pooled)


class SnapKVLayer(EvictingLayer):
    per_token = ("pos", "window_queries", "window_pos", "window_valid")

    def __init__(self, budget: int | float, window: int, kernel: int, pooling: str) -> None:
        super().__init__(budget)
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.window_queries: torch.Tensor | None = None  # [B, H_kv, G, w, D]
        self.window_pos: torch.Tensor | None = None  # [B, w]
        self.window_valid: torch.Tensor | None = None  # [B, w]
        self.scaling = 1.0

    def capacity(self) -> int:
        return max(super().capacity(), self.window)

    def observe(self, pos: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor) -> None:
        """Append this forward's queries to the observation window (the last ``window``)."""
        assert self.owner is not None
        states, self.scaling = self.owner.queries(self.index, keys.shape[1])
        q = states.shape[3]
        new_pos, new_valid = pos[:, 0, -q:], valid[:, 0, -q:]
        if self.window_queries is not None:
            states = torch.cat([self.window_queries, states], dim=3)
            new_pos = torch.cat([self.window_pos, new_pos], dim=1)  # type: ignore[list-item]
            new_valid = torch.cat([self.window_valid, new_valid], dim=1)  # type: ignore[list-item]
        w = self.window
        self.window_queries, self.window_pos, self.window_valid = (
            states[:, :, :, -w:], new_pos[:, -w:], new_valid[:, -w:])  # fmt: skip

    def votes(self, pos: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[B, H, S]`` pooled attention of the window's real queries to each token."""
        assert self.window_queries is not None and self.window_valid is not None
        probs = attend(self.window_queries, self.scaling, keys, self.window_pos, pos, valid)
        return pool(
            (probs * self.window_valid[:, None, :, None]).sum(2), valid, self.kernel, self.pooling
        )

    def in_window(self, pos: torch.Tensor) -> torch.Tensor:
        """``[B, H, S]``: the token is one of the window's (real) positions."""
        assert self.window_pos is not None and self.window_valid is not None
        window = self.window_pos.masked_fill(~self.window_valid, -1)
        return (pos[..., None] == window[:, None, None, :]).any(-1)

    def priority(self, pos: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.votes(pos, valid, keys) + 1e9 * self.in_window(pos).float()

    def reset(self) -> None:
        super().reset()
        self.window_queries = self.window_pos = self.window_valid = None


@KV_POLICIES.register("snapkv")
class SnapKVPolicy(EvictionPolicy):
    summary = "observation-window attention votes, pooled, per KV head (prefill and decoding)"
    paper = "Li et al. 2024 (SnapKV), arXiv:2404.14469"

    attention = True
    layer_class = SnapKVLayer
    name: Literal["snapkv"]
    window: int = Field(16, ge=1, description="observation window: the last queries that vote")
    kernel: int = Field(7, ge=1, description="pooling kernel (odd)")
    pooling: Literal["max", "avg"] = "max"

    @model_validator(mode="after")
    def _odd_kernel(self) -> SnapKVPolicy:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (got {self.kernel}): use {self.kernel + 1}")
        return self

    def layer_args(self) -> tuple[Any, ...]:
        return (self.budget, self.window, self.kernel, self.pooling)
