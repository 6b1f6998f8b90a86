"""Attention probabilities for score-based eviction, without eager attention for the model.

transformers 5.23 hands a cache layer no queries (``update`` gets keys and values only), so
on a torch model a pre-hook on each attention module stashes its ``hidden_states`` and
rotary ``position_embeddings`` in the cache, and ``PolicyCache.queries`` recomputes the
queries ``RoPE(q_norm(q_proj(h)))``; the onnxruntime loop reads them from the graph's
``queries`` outputs instead. ``attend`` is ``softmax(q·kᵀ · scaling)`` over the keys a layer
is about to return, masked to the causal past and real (unpadded) tokens. Recomputed on
torch: the Llama-style attention of llama, mistral, mixtral, qwen2, qwen2_moe, qwen3,
qwen3_moe (per-head q_norm).
"""

from __future__ import annotations

from typing import Any

import torch

from knowpress.core.errors import KnowpressError

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def check_supported(kind: str, policy: str) -> None:
    """One line when queries cannot be recomputed for ``kind`` on a torch model."""
    if kind not in SUPPORTED:
        raise KnowpressError(
            f"{policy}: score-based KV eviction recomputes attention for "
            f"{', '.join(SUPPORTED)}; model_type {kind!r} is not one of them: use streaming "
            "or kivi, or score the exported ONNX graph (it outputs its queries)"
        )


def attention_modules(model: Any, policy: str = "score-based KV eviction") -> list[Any]:
    """Each decoder layer's ``self_attn`` (an unsupported model is one clear line)."""
    check_supported(getattr(model.config, "model_type", "?"), policy)
    return [layer.self_attn for layer in model.model.layers]


def queries(module: Any, hidden: torch.Tensor, rotary: Any, kv_heads: int) -> torch.Tensor:
    """``[B, H_kv, G, q, D]`` float32 queries ``RoPE(q_norm(q_proj(h)))`` of ``hidden
    [B, q, hidden]``, the G query heads of each KV head grouped."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, q, _ = hidden.shape
    states = module.q_proj(hidden).view(b, q, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        states = module.q_norm(states)
    states = states.transpose(1, 2)
    cos, sin = rotary
    states = apply_rotary_pos_emb(states, states, cos, sin)[0].float()
    return states.view(b, kv_heads, states.shape[1] // kv_heads, q, -1)


def attend(states: torch.Tensor, scaling: float, keys: torch.Tensor, query_pos: torch.Tensor,
           key_pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``[B, H_kv, q, S]``: softmax attention of ``states [B, H_kv, G, q, D]`` (at positions
    ``query_pos [B, q]``) over ``keys [B, H_kv, S, D]``, summed over the G query heads of
    each KV head; masked to the causal past and ``key_valid``. Rows with no key get zeros."""
    scores = torch.einsum("bhgqd,bhsd->bhgqs", states, keys.float()) * scaling
    allowed = (key_pos[:, :, None, :] <= query_pos[:, None, :, None]) & key_valid[:, :, None, :]
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0).sum(2)
