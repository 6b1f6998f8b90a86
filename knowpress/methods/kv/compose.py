"""``compose``: an eviction policy chooses the tokens, KIVI stores them (``policies:
[eviction, kivi]``), so the bytes multiply down: ``budget`` tokens of ``bits``-wide codes.

Each layer is the eviction policy's own layer (its scores, its budget) with quantized
storage: the stored tokens are ``[quantized history | full-precision tail]`` in position
order. The tail holds the newest ``residual`` to ``residual + group_size − 1`` kept tokens;
whole groups leaving it are quantized as KIVI does (keys per channel in blocks of
``group_size`` tokens, values per token in groups of ``group_size`` channels, 2/3/4-bit codes,
fp16 scales and zeros). Codes stay per token, so an eviction gathers them like keys; each
token records its key block (uint8 while ≤ 256 blocks are alive, else int16), and blocks no
token uses are dropped. The tail and the new tokens are never evicted while they fit the
budget, so per head the same number of history tokens survives. When a head keeps more
history tokens than another, the extra ones move back to the tail as their dequantized
values (exact: they are re-quantized later with a new block scale).

Bytes per token ≈ ``budget/seen · 2 · layers · kv_heads · head_dim · (bits/8 + …)``.

```yaml
runtime policy:
  name: compose
  policies: [{name: snapkv, budget: 0.25}, {name: kivi, bits: 2, group_size: 32, residual: 32}]
```
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import SerializeAsAny, field_validator

from knowpress.methods.kv.base import (
    KV_POLICIES,
    CacheShape,
    EvictionPolicy,
    KVPolicy,
    Probe,
    float_nbytes,
)
from knowpress.methods.kv.evicting import policy_cache
from knowpress.methods.kv.kivi import KIVIPolicy, _nbytes, check_group, dequantize, encode

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel


def block_dtype(blocks: int) -> torch.dtype:
    """The narrowest dtype for key-block ids: uint8 while ≤ 256 blocks are alive."""
    return torch.uint8 if blocks <= 256 else torch.int16


STORE = ("kcodes", "kblock", "kscale", "kzero", "vcodes", "vscale", "vzero")


class QuantizedStorage:
    """Mixed into an ``EvictingLayer`` subclass (``quantized``): storage, not scoring."""

    bits: int
    group: int
    residual: int

    def init_store(self, bits: int, group: int, residual: int) -> None:
        self.bits, self.group, self.residual, self._tail = bits, group, residual, 0
        for name in STORE:
            setattr(self, name, None)

    def history(self) -> int:
        return 0 if self.kcodes is None else self.kcodes.shape[2]

    def stored(self) -> int:
        pending = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
        return self.history() + pending

    def protected(self) -> int:
        return self._tail

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """History keys and values ``[B, H, n, D]`` (each token's key block's scale/zero)."""
        d = self.kscale.shape[-1]
        block = self.kblock.long()[..., None].expand(*self.kblock.shape, d)
        scale, zero = self.kscale.gather(2, block), self.kzero.gather(2, block)
        keys = dequantize((self.kcodes, scale, zero, tuple(scale.shape)), self.bits, dtype)
        values = dequantize((self.vcodes, self.vscale, self.vzero,
                             (*self.vscale.shape[:-1], self.group)), self.bits, dtype)  # fmt: skip
        return keys, values.flatten(-2)

    def joined(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        b, h, q, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        keys, values = [key_states], [value_states]
        if self.keys.dim() == 4:
            keys, values = [self.keys, *keys], [self.values, *values]
        if self.history():
            old_k, old_v = self.dequantized(key_states.dtype)
            keys, values = [old_k, *keys], [old_v, *values]
        self._tail = self.stored() - self.history() + q
        pos = new if self.pos is None else torch.cat([self.pos, new], dim=-1)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), pos

    def keep(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
             index: torch.Tensor | None) -> None:  # fmt: skip
        b, h, s, d = keys.shape
        if index is None:
            index = torch.arange(s, device=keys.device).expand(b, h, s)
        n = self.history()
        m = int((index < n).sum(-1).min()) if n else 0  # history kept by every head
        if n:
            self._gather_store(index[..., :m])
        rest = index[..., m:, None].expand(b, h, index.shape[-1] - m, d)
        self.pos = pos.gather(-1, index)
        valid = self._valid(self.pos[..., m:])  # pads stay out of the key blocks' ranges
        self._flush(keys.gather(2, rest), values.gather(2, rest), valid)

    def _gather_store(self, index: torch.Tensor) -> None:
        def take(t: torch.Tensor) -> torch.Tensor:
            shaped = index.view(*index.shape, *([1] * (t.dim() - 3)))
            return t.gather(2, shaped.expand(*index.shape, *t.shape[3:]))

        for name in ("kcodes", "kblock", "vcodes", "vscale", "vzero"):
            setattr(self, name, take(getattr(self, name)))
        used, block = torch.unique(self.kblock.long(), return_inverse=True)
        self.kscale, self.kzero = self.kscale[:, :, used], self.kzero[:, :, used]
        self.kblock = block.to(block_dtype(len(used)))

    def _flush(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep ``keys``/``values`` as the tail, quantizing whole groups beyond ``residual``
        (``valid [B, H, s]``: which are real tokens)."""
        s = keys.shape[-2]
        n = max(0, s - self.residual) // self.group * self.group
        if n:
            self._append(keys[..., :n, :], values[..., :n, :], valid[..., :n])
        self.keys, self.values = keys[..., n:, :], values[..., n:, :]

    def _append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        b, h, n, _ = keys.shape
        (kcodes, kscale, kzero, _), (vcodes, vscale, vzero, _) = encode(
            keys, values, self.bits, self.group, valid)  # fmt: skip
        blocks = 0 if self.kscale is None else self.kscale.shape[2]
        block = (blocks + torch.arange(n, device=keys.device) // self.group).expand(b, h, n)
        new = {"kcodes": kcodes.reshape(b, h, n, -1), "kblock": block,
               "kscale": kscale[:, :, :, 0], "kzero": kzero[:, :, :, 0],
               "vcodes": vcodes, "vscale": vscale, "vzero": vzero}  # fmt: skip
        for name, tensor in new.items():
            old = getattr(self, name)
            setattr(self, name, tensor if old is None else torch.cat([old.to(tensor.dtype),
                                                                      tensor], dim=2))  # fmt: skip
        self.kblock = self.kblock.to(block_dtype(self.kscale.shape[2]))

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Codes, block ids, scales and zeros of the history, plus the full-precision tail
        (at ``float_bytes`` per value: the deploy dtype's width)."""
        tensors = [getattr(self, name) for name in STORE]
        tail = 0
        if self.is_initialized and self.keys.dim() == 4:
            tail = sum(float_nbytes(t, float_bytes) for t in (self.keys, self.values))
        return sum(_nbytes(t) for t in tensors if t is not None) + tail

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.init_store(self.bits, self.group, self.residual)


@cache
def quantized(layer_class: type) -> type:
    """``layer_class`` (an ``EvictingLayer``) with ``QuantizedStorage`` in front of it."""
    return type(f"Quantized{layer_class.__name__}", (QuantizedStorage, layer_class),
                {"per_token": (*layer_class.per_token, *STORE)})  # fmt: skip


@KV_POLICIES.register("compose")
class ComposePolicy(KVPolicy):
    summary = "an eviction policy's tokens stored by KIVI: the byte savings multiply"
    paper = "knowpress (eviction × quantization)"

    name: Literal["compose"]
    policies: list[SerializeAsAny[KVPolicy]]

    @field_validator("policies", mode="before")
    @classmethod
    def _members(cls, value: Any) -> list[KVPolicy]:
        from knowpress.methods.kv.base import policy_from_json

        if not isinstance(value, list) or len(value) != 2:
            raise ValueError("compose takes two policies: [an eviction policy, kivi]")
        members = [v if isinstance(v, KVPolicy) else policy_from_json(v, "compose.policies")
                   for v in value]  # fmt: skip
        if not isinstance(members[0], EvictionPolicy) or type(members[1]) is not KIVIPolicy:
            got = ", ".join(m.name for m in members)
            raise ValueError(f"compose takes [an eviction policy, kivi] in that order, got {got}")
        return members

    @property
    def eviction(self) -> EvictionPolicy:
        return self.policies[0]  # type: ignore[return-value]

    @property
    def storage(self) -> KIVIPolicy:
        return self.policies[1]  # type: ignore[return-value]

    def with_budget(self, budget: int | float) -> KVPolicy:
        return self.model_copy(update={"policies": [self.eviction.with_budget(budget),
                                                    self.storage]})  # fmt: skip

    def check(self, shape: CacheShape, runtime: str = "torch") -> None:
        check_group(shape, self.storage.group_size, "compose: kivi")
        self.eviction.check(shape, runtime)

    def graph_io(self) -> frozenset[str]:
        return self.eviction.graph_io()

    def layers(self, shape: CacheShape, probe: Probe | None = None) -> list[Any]:
        kivi, eviction = self.storage, self.eviction
        check_group(shape, kivi.group_size, "compose: kivi")
        layers = []
        for _ in range(shape.layers):
            layer = quantized(eviction.layer_class)(*eviction.layer_args())
            layer.init_store(kivi.bits, kivi.group_size, kivi.residual)
            layers.append(layer)
        return layers

    def make_cache(self, model: PreTrainedModel) -> Cache:
        return policy_cache(model, self.layers(CacheShape.of(model)),
                            attention=self.eviction.attention)  # fmt: skip
