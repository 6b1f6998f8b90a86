"""``streaming``: attention sinks + a recent window (StreamingLLM, Xiao et al. 2024,
"Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453).

Every layer keeps each row's first ``sinks`` real tokens and its last ``budget − sinks``
tokens, ``budget`` in all (a ratio budget: ``⌈budget · seen⌉``); the rest is evicted after
every forward (prefill and each decoding step, ``evicting.py``), so the cache stays bounded
while generating: ``bytes/token → 2 · layers · kv_heads · head_dim · itemsize · budget /
seen``.
Kept keys keep the rotary positions they were written with (no re-rotation, as kvpress).

```yaml
runtime policy: {name: streaming, sinks: 4, budget: 128}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from knowpress.methods.kv.base import KV_POLICIES, EvictionPolicy
from knowpress.methods.kv.evicting import EvictingLayer


class StreamingLayer(EvictingLayer):
    def __init__(self, sinks: int, budget: int | float) -> None:
        super().__init__(budget)
        self.sinks = sinks

    def capacity(self) -> int:
        return max(super().capacity(), self.sinks + 1)  # at least one recent token

    def priority(self, pos: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:  # fmt: skip
        rank = valid.long().cumsum(-1) - 1  # order among the row's real tokens
        real = valid.sum(-1, keepdim=True)
        score = 2.0 * (valid & (rank < self.sinks)).float()
        window = self.capacity() - self.sinks
        score += 1.0 * (valid & (rank >= real - window)).float()
        return score + pos.float() / (4 * (self.seen + 1))  # ties: the more recent


@KV_POLICIES.register("streaming")
class StreamingPolicy(EvictionPolicy):
    summary = "attention sinks + recent window, evicted in prefill and decoding"
    paper = "Xiao et al. 2024 (StreamingLLM), arXiv:2309.17453"

    layer_class = StreamingLayer
    name: Literal["streaming"]
    sinks: int = Field(4, ge=0, description="first tokens always kept")

    def layer_args(self) -> tuple[Any, ...]:
        return (self.sinks, self.budget)
