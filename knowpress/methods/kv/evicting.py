"""Caches that hold fewer tokens than they have seen: the machinery every eviction policy
shares (one subclass of ``EvictingLayer`` per policy: its ``priority``).

transformers 5 builds one attention mask for all layers from the cache's first full-attention
layer, so an evicting layer follows ``DynamicSlidingWindowLayer``'s rules: ``get_seq_length``
is the tokens *seen* (positions of new tokens), ``get_mask_sizes(q)`` is ``(stored + q,
seen − stored)`` (the tail of the 2-D mask lines up with what is stored, in position order),
and ``update`` returns stored + new for this forward's attention, then keeps the ``budget``
tokens of highest priority. Every layer keeps the same number, so one mask fits all.

Padding: a forward pre-hook on the model stashes the 2-D ``attention_mask`` in the cache
(``PolicyCache.valid``), padded positions are evicted first and a row's sinks are its first
real tokens, so left-padded batches evict what one row alone would.

A forward never sees its own compression: the prompt attends to all of itself, later
forwards (each decoding step) to what was kept, as kvpress compresses after prefill.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from knowpress.core.errors import KnowpressError

HOOK = "_knowpress_kv_mask_hook"
PAD_KEY = 1e12  # below every policy's priority (they stay within ±1e10)
ATTENTION_HOOK = "_knowpress_kv_attention_hook"


class PolicyCache(Cache):
    """A cache of evicting layers; ``valid`` = the 2-D mask (bool) over every position seen
    up to the end of the current forward (a torch model's pre-hook, or the onnxruntime loop,
    sets it)."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__(layers=layers)
        self.valid: torch.Tensor | None = None
        # layer index -> (attention module, hidden states, (cos, sin)) of the current forward,
        # for policies that score tokens by attention (a pre-hook on each self_attn fills it)
        self.attention_inputs: dict[int, tuple[Any, torch.Tensor, Any]] = {}
        for index, layer in enumerate(layers):
            layer.owner, layer.index = self, index

    def slot_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """``mask [B, seen + q]`` with its stored tail (the columns transformers lines up
        with the stored slots, ``get_mask_sizes``) replaced by whether each stored slot holds
        a real token. The tail of the positions seen is not that when pads sit between kept
        tokens (a context, then a left-padded question). Every head and layer keeps the same
        pads (``EvictingLayer.update``), so layer 0's head 0 speaks for all."""
        layer = self.layers[0]
        if not isinstance(layer, EvictingLayer) or layer.pos is None or layer.pos.dim() != 3:
            return None
        stored, seen = layer.stored(), layer.seen
        if not stored or mask.shape[-1] < seen:
            return None
        out = mask.clone()
        out[:, seen - stored : seen] = mask.gather(-1, layer.pos[:, 0].to(mask.device))
        return out

    def queries(self, index: int, kv_heads: int) -> tuple[torch.Tensor, float]:
        """The current forward's post-rotary queries of layer ``index``, ``[B, H_kv, G, q,
        D]`` float32, and the attention scaling (recomputed from the hooked inputs)."""
        from knowpress.methods.kv.attention import queries

        module, hidden, rotary = self.attention_inputs[index]
        return queries(module, hidden, rotary, kv_heads), float(module.scaling)


class EvictingLayer(DynamicLayer):
    #: per-token state ``[B, ...]`` that batch reordering must follow besides keys and values
    per_token: tuple[str, ...] = ("pos",)
    is_sliding = False  # the mask builder must still read this layer as full attention
    is_croppable = False  # an eviction cannot be rolled back (assisted decoding crops)

    def __init__(self, budget: int | float) -> None:
        super().__init__()
        self.budget, self.seen, self.index = budget, 0, 0
        self.pos: torch.Tensor | None = None  # [B, H, S] position of each stored token, per head
        self.owner: PolicyCache | None = None

    def capacity(self) -> int:
        """Tokens kept after this forward: ``budget`` tokens, or ``⌈budget · seen⌉`` for a
        ratio (``seen`` counts padded positions of the batch)."""
        if isinstance(self.budget, int):
            return self.budget
        return max(1, math.ceil(self.budget * self.seen))

    def priority(self, pos: torch.Tensor, valid: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``[B, H, S]`` scores of the stored + new tokens per KV head (higher: kept)."""
        raise NotImplementedError

    def observe(self, pos: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor) -> None:
        """Called on every forward with the stored + new tokens (scores accumulate here)."""

    def kept(self, keep: torch.Tensor) -> None:
        """Called with the ``[B, H, budget]`` indices kept, to cut per-token state alike."""

    def slack(self) -> int:
        """Tokens the cache may grow past its capacity before it evicts back down to it."""
        return 0

    def protected(self) -> int:
        """Trailing tokens of the stored + new sequence that must not be evicted (a quantized
        store's full-precision tail, ``compose.py``)."""
        return 0

    def stored(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def get_seq_length(self) -> int:
        return self.seen

    def past(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What the next forward attends to before its own tokens: keys, values ``[B, H, S,
        D]`` and which slots hold a real token ``[B, H, S]`` (None before the first update).
        The onnxruntime loop feeds these to its graph as the past."""
        if not self.is_initialized or self.keys.dim() != 4:
            return None
        keys, values, pos, *live = self.joined(self.keys[..., :0, :], self.values[..., :0, :])
        valid = self._valid(pos)
        return keys, values, (valid & live[0]) if live else valid

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def get_max_cache_shape(self) -> int:
        return -1

    def joined(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Stored + new keys, values ``[B, H, S, D]`` and positions ``[B, H, S]``."""
        b, h, q, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        if self.keys.dim() != 4:
            return key_states, value_states, new
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2),
                torch.cat([self.pos, new], dim=-1))  # type: ignore[list-item]  # fmt: skip

    def keep(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
             index: torch.Tensor | None) -> None:  # fmt: skip
        """Store the tokens at ``index [B, H, n]`` (all of them when None)."""
        if index is None:
            self.keys, self.values, self.pos = keys, values, pos
            return
        self.pos = pos.gather(-1, index)
        gather = index[..., None].expand(*index.shape, keys.shape[-1])
        self.keys, self.values = keys.gather(2, gather), values.gather(2, gather)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values, pos = self.joined(key_states, value_states)
        self.seen += key_states.shape[-2]
        valid = self._valid(pos)
        self.observe(pos, valid, keys)
        budget = self.capacity()
        if keys.shape[-2] <= budget + self.slack():
            self.keep(keys, values, pos, None)
            return keys, values
        # pads go first, and the earliest pads are the ones kept when some must be: every head
        # then keeps the same set of pads, so one row mask describes all heads (float64: the
        # pad keys stay below any priority and distinct by position)
        score = torch.where(valid, self.priority(pos, valid, keys).double(),
                            -PAD_KEY - pos.double())  # fmt: skip
        tail = self.protected()
        if 0 < tail <= budget:
            score[..., -tail:] = float("inf")
        # ties go to the earlier slot (a stable sort over slots in position order), so the
        # choice does not depend on where a batch's pads put a token
        index = score.sort(dim=-1, descending=True, stable=True).indices[..., :budget]
        index = index.sort(-1).values  # position order
        self.kept(index)
        self.keep(keys, values, pos, index)
        return keys, values

    def _valid(self, pos: torch.Tensor) -> torch.Tensor:
        """``[B, H, S]``: which of the tokens at ``pos`` are real (not padding)."""
        mask = self.owner.valid if self.owner is not None else None
        if mask is None or mask.shape[-1] < self.seen:
            return torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
        rows = mask.to(pos.device)[:, None, :].expand(-1, pos.shape[1], -1)
        return rows.gather(-1, pos)

    def reset(self) -> None:
        super().reset()
        self.seen, self.pos = 0, None

    def crop(self, max_length: int) -> None:
        raise KnowpressError("an evicting KV cache cannot be cropped (assisted decoding)")

    def _each_state(self, change: Any) -> None:
        for name in self.per_token:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, change(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._each_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._each_state(lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._each_state(lambda t: t[indices])


def _stash_mask(_model: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """Stash the 2-D mask for the layers (``valid``) and hand the model one whose stored
    tail says which stored slots are real (``PolicyCache.slot_mask``)."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, PolicyCache):
        return None
    mask = kwargs.get("attention_mask")
    cache.valid = mask.bool() if mask is not None and mask.ndim == 2 else None
    if cache.valid is None:
        return None
    aligned = cache.slot_mask(mask)
    return None if aligned is None else (args, {**kwargs, "attention_mask": aligned})


def _stash_attention(module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, PolicyCache):
        cache.attention_inputs[module.layer_idx] = (
            module, kwargs["hidden_states"], kwargs.get("position_embeddings"))  # fmt: skip


def policy_cache(model: Any, layers: list[Any], attention: bool = False) -> PolicyCache:
    """A ``PolicyCache`` of ``layers`` (one per decoder layer of ``model``, full attention
    only); the mask hook (and with ``attention`` the attention-input hooks) go on ``model``
    once."""
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise KnowpressError(
            f"KV policies support full-attention models; this one has {sorted(kinds)} layers"
        )
    if not getattr(model, HOOK, False):
        model.register_forward_pre_hook(_stash_mask, with_kwargs=True)
        setattr(model, HOOK, True)
    if attention and not getattr(model, ATTENTION_HOOK, False):
        from knowpress.methods.kv.attention import attention_modules

        for module in attention_modules(model):
            module.register_forward_pre_hook(_stash_attention, with_kwargs=True)
        setattr(model, ATTENTION_HOOK, True)
    return PolicyCache(layers)
