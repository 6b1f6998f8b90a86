"""The graph I/O a KV policy needs in the onnxruntime loop, added at export time.

``KVPolicy.graph_io()`` names them (``methods/kv/base.py``):

- ``queries`` (attention-scored eviction: h2o, snapkv, rkv, their compositions and
  ``head_budget``'s probes): outputs ``queries.{i} [batch, heads, sequence, head_dim]``, the
  post-rotary queries each attention layer computed — what ``attention.queries`` recomputes
  on a torch model;
- ``past_valid`` (``head_budget``: heads keep different numbers of tokens): inputs
  ``past_valid.{i} [batch, kv_heads, past_sequence]`` (bool), each head's mask over its
  past, combined with the model's causal/padding mask over the new tokens exactly as
  ``head_budget_attention`` does on torch (``head_mask``).

Both come from one attention function, ``graph_attention`` (sdpa, registered as
``knowpress_graph_io``), which the exported model uses while it is traced: it reads the
per-layer slot the wrapper fills (``SLOT`` on each attention module) and records its query.
A graph exported without a policy has neither and is the plain decoder signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: outputs ``queries.{i}``: each layer's post-rotary queries ``[B, H_q, q, D]``
QUERIES = "queries"
#: inputs ``past_valid.{i}``: each layer's per-KV-head mask over its past ``[B, H_kv, past]``
PAST_VALID = "past_valid"
ATTENTION = "knowpress_graph_io"
SLOT = "_knowpress_graph_io"  # on an attention module while traced: {"valid", "queries"}
KNOWN = frozenset({QUERIES, PAST_VALID})


def graph_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None,
                    **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """sdpa that records ``query`` and, given a per-head past mask, applies it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from knowpress.tensors.kv_masks import head_mask

    slot = module.__dict__.get(SLOT)
    if slot is not None:
        slot["queries"] = query
        if slot.get("valid") is not None:
            attention_mask = head_mask(slot["valid"], attention_mask, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_modules(model: Any) -> list[Any]:
    from knowpress.arch.layers import decoder_layers

    return [layer.self_attn for layer in decoder_layers(model)[1]]


@contextmanager
def traced_with(model: Any, io: frozenset[str]) -> Iterator[None]:
    """``model`` on ``graph_attention`` while it is exported (no change without ``io``)."""
    if not io:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, graph_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def open_slots(modules: list[Any], valid: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """One slot per attention module (its ``past_valid`` input when the graph has them)."""
    slots = []
    for i, module in enumerate(modules):
        slot = {"valid": valid[i] if valid else None}
        module.__dict__[SLOT] = slot
        slots.append(slot)
    return slots


def close_slots(modules: list[Any]) -> None:
    for module in modules:
        module.__dict__.pop(SLOT, None)
