"""``kivi``: keys quantized per channel, values per token, a recent window in full precision
(Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv:2402.02750).

Per layer, the newest tokens wait in full precision (the residual); once more than
``residual`` are waiting, the oldest whole groups of ``group_size`` tokens are quantized and
never touched again (append-only, as KIVI streams): keys ``[n, D]`` in blocks of
``group_size`` tokens, one asymmetric min/max scale and zero per channel per block (key
outliers live in channels); values in groups of ``group_size`` channels of each token. Codes
are packed ``bits`` wide (2, 3 or 4; KIVI itself uses 2 and 4), scales and zeros in fp16.
Attention reads the dequantized history + the residual. Bytes per token ≈
``2 · layers · kv_heads · head_dim · (bits/8 + 2·2/group_size)`` once the history dominates.

```yaml
runtime policy: {name: kivi, bits: 2, group_size: 32, residual: 128}
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from transformers.cache_utils import DynamicLayer

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv.base import KV_POLICIES, CacheShape, KVPolicy, Probe, float_nbytes
from knowpress.tensors.packing import pack, unpack

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

Chunk = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]
]  # packed, scale, zero, shape


def quantize(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None) -> Chunk:
    """Asymmetric min/max codes of ``x`` with one scale and zero along ``dim`` (kept 1);
    ``valid`` (broadcastable to ``x``) leaves padding out of the min/max, so a row's codes
    do not depend on what its batch's pads happen to hold (a group of pads alone: zero)."""
    if valid is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = ~valid.expand_as(x).any(dim, keepdim=True)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = ((x - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return pack(codes, bits), scale.half(), lo.half(), tuple(codes.shape)


def dequantize(chunk: Chunk, bits: int, dtype: torch.dtype) -> torch.Tensor:
    packed, scale, zero, shape = chunk
    codes = unpack(packed, bits, shape[-1]).reshape(shape)
    return (codes.to(dtype) * scale.to(dtype) + zero.to(dtype)).to(dtype)


def encode(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int,
           valid: torch.Tensor | None = None) -> tuple[Chunk, Chunk]:  # fmt: skip
    """KIVI codes of ``n`` tokens (``[B, H, n, D]``, n a multiple of ``group``): keys in
    blocks of ``group`` tokens per channel, values in groups of ``group`` channels;
    ``valid [B, H or 1, n]`` marks real tokens (padding is left out of the key blocks'
    ranges; a pad's own value groups hold zeros)."""
    b, h, n, d = keys.shape
    if valid is None:
        return (quantize(keys.reshape(b, h, n // group, group, d), bits, 3),
                quantize(values.reshape(b, h, n, d // group, group), bits, 4))  # fmt: skip
    real = valid.to(torch.bool)[..., None]  # [B, H|1, n, 1]
    keys, values = keys.masked_fill(~real, 0.0), values.masked_fill(~real, 0.0)
    blocks = real.reshape(b, real.shape[1], n // group, group, 1)
    return (quantize(keys.reshape(b, h, n // group, group, d), bits, 3, blocks),
            quantize(values.reshape(b, h, n, d // group, group), bits, 4))  # fmt: skip


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class KIVILayer(DynamicLayer):
    def __init__(self, bits: int, group: int, residual: int) -> None:
        super().__init__()
        self.bits, self.group, self.residual, self.seen = bits, group, residual, 0
        self.chunks: list[tuple[Any, ...]] = []  # encoded history, oldest first

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.seen + query_length, 0

    def past(self) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        """The dequantized history + the residual ``[B, H, seen, D]`` (every position seen, in
        order: the row's own mask says which are real), for the onnxruntime loop."""
        if not self.is_initialized or self.keys.dim() != 4:
            return None
        history = [self.decode(c, self.keys.dtype) for c in self.chunks]
        return (torch.cat([*(k for k, _ in history), self.keys], -2),
                torch.cat([*(v for _, v in history), self.values], -2), None)  # fmt: skip

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[Any, ...]:  # fmt: skip
        """One chunk of ``n`` tokens (``encode``; GEAR adds its low-rank and sparse parts);
        ``valid [B, 1, n]``: which are real tokens."""
        return encode(keys, values, self.bits, self.group, valid)

    def columns(self, start: int, n: int) -> torch.Tensor | None:
        """``[B, 1, n]``: which of the columns ``start .. start + n`` are real (the runtime's
        2-D mask, ``PolicyCache.valid``; None when the cache has none)."""
        mask = getattr(getattr(self, "owner", None), "valid", None)
        if mask is None or mask.shape[-1] < start + n:
            return None
        return mask[:, None, start : start + n]

    def decode(self, chunk: tuple[Any, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(keys, values)`` ``[B, H, n, D]`` of an encoded chunk."""
        keys, values = (dequantize(c, self.bits, dtype) for c in chunk[:2])
        b, h = keys.shape[:2]
        return keys.reshape(b, h, -1, keys.shape[-1]), values.reshape(b, h, values.shape[2], -1)

    def chunk_bytes(self, chunk: tuple[Any, ...]) -> int:
        return sum(_nbytes(t) for c in chunk[:2] for t in c[:3])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], -2) if self.keys.dim() == 4 else key_states
        values = (
            torch.cat([self.values, value_states], -2) if self.values.dim() == 4 else value_states
        )
        history = [self.decode(c, keys.dtype) for c in self.chunks]
        out = (torch.cat([*(k for k, _ in history), keys], -2),
               torch.cat([*(v for _, v in history), values], -2))  # fmt: skip
        n = max(0, keys.shape[-2] - self.residual) // self.group * self.group
        if n:
            valid = self.columns(self.seen - keys.shape[-2], n)
            self.chunks.append(self.encode(keys[..., :n, :], values[..., :n, :], valid))
            keys, values = keys[..., n:, :], values[..., n:, :]
        self.keys, self.values = keys, values
        return out

    def nbytes(self, float_bytes: int | None = None) -> int:
        """The encoded history (packed codes, fp16 scales and zeros, ...) plus the residual
        (at ``float_bytes`` per value: the deploy dtype's width)."""
        residual = [t for t in (self.keys, self.values) if t is not None and t.dim() == 4]
        return sum(self.chunk_bytes(c) for c in self.chunks) + sum(
            float_nbytes(t, float_bytes) for t in residual
        )

    def reset(self) -> None:
        super().reset()
        self.seen, self.chunks = 0, []

    def crop(self, max_length: int) -> None:
        raise KnowpressError("a quantized KV cache cannot be cropped (assisted decoding)")


def check_group(shape: CacheShape, group_size: int, name: str) -> None:
    """``group_size`` divides the model's head dim (one line naming the divisors otherwise)."""
    if shape.head_dim % group_size:
        divisors = [d for d in (64, 32, 16, 8, 4, 2) if shape.head_dim % d == 0]
        raise KnowpressError(
            f"{name}: group_size {group_size} does not divide the head dim {shape.head_dim}; "
            f"set group_size to a divisor of {shape.head_dim}"
            + (f" ({', '.join(map(str, divisors))})" if divisors else "")
        )


@KV_POLICIES.register("kivi")
class KIVIPolicy(KVPolicy):
    summary = "keys per channel, values per token, 2/3/4-bit, recent window in full precision"
    paper = "Liu et al. 2024 (KIVI), arXiv:2402.02750"

    name: Literal["kivi"]
    bits: Literal[2, 3, 4] = 2
    group_size: int = Field(32, ge=2, description="tokens per key block, channels per value group")
    residual: int = Field(128, ge=0, description="most recent tokens kept in full precision")

    def layer(self) -> KIVILayer:
        return KIVILayer(self.bits, self.group_size, self.residual)

    def check(self, shape: CacheShape, runtime: str = "torch") -> None:
        check_group(shape, self.group_size, self.name)

    def layers(self, shape: CacheShape, probe: Probe | None = None) -> list[Any]:
        self.check(shape)
        return [self.layer() for _ in range(shape.layers)]

    def make_cache(self, model: PreTrainedModel) -> Cache:
        from knowpress.methods.kv.evicting import policy_cache

        return policy_cache(model, self.layers(CacheShape.of(model)))  # the mask hook: pads
