"""``rkv``: importance minus redundancy, recompressed every ``buffer`` tokens (Cai et al.
2025, "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", arXiv:2505.24133).

Per KV head, over the stored + new tokens j:

- importance ``I_j``: the observation window's pooled attention votes (``snapkv.py``),
  normalised to sum to 1 over the head's tokens;
- redundancy ``R_j = softmax_j(mean_{i≠j} cos(k_i, k_j))`` over the head's real tokens:
  a key much like the others carries little of its own;
- score ``Z_j = λ·I_j − (1 − λ)·R_j``; the window is always kept.

The cache grows to ``budget + buffer`` tokens, then is cut back to ``budget`` (the paper
compresses every ``buffer`` decoded tokens, which amortises the S×S similarity).

```yaml
runtime policy: {name: rkv, budget: 128, buffer: 32, lam: 0.1, window: 8}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from knowpress.methods.kv.base import KV_POLICIES, EvictionPolicy
from knowpress.methods.kv.snapkv import SnapKVLayer


def redundancy(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]``: softmax over real tokens of each key's mean cosine similarity to the
    other real keys of its head (``keys [B, H, S, D]``, ``valid [B, H, S]``)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = unit @ unit.transpose(-1, -2)  # [B, H, S, S]
    pair = valid[..., :, None] & valid[..., None, :]
    pair &= ~torch.eye(keys.shape[-2], dtype=torch.bool, device=keys.device)
    mean = (sim * pair).sum(-1) / pair.sum(-1).clamp_min(1)
    return mean.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)


class RKVLayer(SnapKVLayer):
    def __init__(self, budget: int | float, buffer: int, lam: float, window: int,
                 kernel: int) -> None:  # fmt: skip
        super().__init__(budget, window, kernel, "max")
        self.buffer, self.lam = buffer, lam

    def slack(self) -> int:
        return self.buffer

    def priority(self, pos: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:  # fmt: skip
        votes = self.votes(pos, valid, keys).masked_fill(~valid, 0.0)
        importance = votes / votes.sum(-1, keepdim=True).clamp_min(1e-12)
        score = self.lam * importance - (1 - self.lam) * redundancy(keys, valid)
        return score + 1e9 * self.in_window(pos).float()


@KV_POLICIES.register("rkv")
class RKVPolicy(EvictionPolicy):
    summary = "attention importance minus key redundancy, recompressed every `buffer` tokens"
    paper = "Cai et al. 2025 (R-KV), arXiv:2505.24133"

    attention = True
    layer_class = RKVLayer
    name: Literal["rkv"]
    buffer: int = Field(32, ge=0, description="tokens the cache may grow by before recompressing")
    lam: float = Field(0.1, ge=0, le=1, description="λ: weight of importance vs redundancy")
    window: int = Field(8, ge=1, description="observation window: the last queries that vote")
    kernel: int = Field(7, ge=1, description="pooling kernel of the votes (odd)")

    def layer_args(self) -> tuple[Any, ...]:
        return (self.budget, self.buffer, self.lam, self.window, self.kernel)
