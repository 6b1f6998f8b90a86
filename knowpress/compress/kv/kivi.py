"""``kivi``: keys quantized per channel, values per token, a recent window in full precision
(Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv:2402.02750).

Per layer, the newest tokens wait in full precision (the residual); once more than
``residual`` are waiting, the oldest whole groups of ``group_size`` tokens are quantized and
never touched again (append-only, as KIVI streams): keys ``[n, D]`` in blocks of
``group_size`` tokens, one asymmetric min/max scale and zero per channel per block (key
outliers live in channels); values in groups of ``group_size`` channels of each token. Codes
are packed ``bits`` wide, scales and zeros stored in fp16. Attention reads the dequantized
history + the residual. Bytes per token ≈ ``2 · layers · kv_heads · head_dim ·
(bits/8 + 2·2/group_size)`` once the history dominates the residual.

```yaml
runtime policy: {name: kivi, bits: 2, group_size: 32, residual: 128}
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from transformers.cache_utils import Cache, DynamicLayer

from knowpress.compress.kv.base import KV_POLICIES, KVPolicy
from knowpress.compress.quant.packing import pack, unpack
from knowpress.errors import KnowpressError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Chunk = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]
]  # packed, scale, zero, shape


def quantize(x: torch.Tensor, bits: int, dim: int) -> Chunk:
    """Asymmetric min/max codes of ``x`` with one scale and zero along ``dim`` (kept 1)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = ((x - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return pack(codes, bits), scale.half(), lo.half(), tuple(codes.shape)


def dequantize(chunk: Chunk, bits: int, dtype: torch.dtype) -> torch.Tensor:
    packed, scale, zero, shape = chunk
    codes = unpack(packed, bits, shape[-1]).reshape(shape)
    return (codes.to(dtype) * scale.to(dtype) + zero.to(dtype)).to(dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class KIVILayer(DynamicLayer):
    def __init__(self, bits: int, group: int, residual: int) -> None:
        super().__init__()
        self.bits, self.group, self.residual, self.seen = bits, group, residual, 0
        self.key_chunks: list[Chunk] = []
        self.value_chunks: list[Chunk] = []

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.seen + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], -2) if self.keys.dim() == 4 else key_states
        values = (
            torch.cat([self.values, value_states], -2) if self.values.dim() == 4 else value_states
        )
        b, h, _, d = keys.shape
        dtype = keys.dtype
        history_k = [dequantize(c, self.bits, dtype).reshape(b, h, -1, d) for c in self.key_chunks]
        history_v = [
            dequantize(c, self.bits, dtype).reshape(b, h, -1, d) for c in self.value_chunks
        ]
        out = torch.cat([*history_k, keys], -2), torch.cat([*history_v, values], -2)
        n = max(0, keys.shape[-2] - self.residual) // self.group * self.group
        if n:
            g = self.group
            self.key_chunks.append(
                quantize(keys[..., :n, :].reshape(b, h, n // g, g, d), self.bits, 3)
            )
            self.value_chunks.append(
                quantize(values[..., :n, :].reshape(b, h, n, d // g, g), self.bits, 4)
            )
            keys, values = keys[..., n:, :], values[..., n:, :]
        self.keys, self.values = keys, values
        return out

    def nbytes(self) -> int:
        """Packed codes, fp16 scales and zeros of the history, plus the residual."""
        chunks = [t for c in (*self.key_chunks, *self.value_chunks) for t in c[:3]]
        residual = [t for t in (self.keys, self.values) if t is not None and t.dim() == 4]
        return sum(_nbytes(t) for t in (*chunks, *residual))

    def reset(self) -> None:
        super().reset()
        self.seen, self.key_chunks, self.value_chunks = 0, [], []

    def crop(self, max_length: int) -> None:
        raise KnowpressError("a quantized KV cache cannot be cropped (assisted decoding)")


@KV_POLICIES.register("kivi")
class KIVIPolicy(KVPolicy):
    summary = "keys per channel, values per token, 2/4-bit, recent window in full precision"
    paper = "Liu et al. 2024 (KIVI), arXiv:2402.02750"

    name: Literal["kivi"]
    bits: Literal[2, 4] = 2
    group_size: int = Field(32, ge=2, description="tokens per key block, channels per value group")
    residual: int = Field(128, ge=0, description="most recent tokens kept in full precision")

    def make_cache(self, model: PreTrainedModel) -> Cache:
        config = model.config.get_text_config(decoder=True)
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        if head_dim % self.group_size:
            raise KnowpressError(
                f"kivi: group_size {self.group_size} does not divide the head dim {head_dim}; "
                f"use a divisor of {head_dim}"
            )
        layers = [KIVILayer(self.bits, self.group_size, self.residual)
                  for _ in range(config.num_hidden_layers)]  # fmt: skip
        return Cache(layers=layers)
