"""Attention masks over a KV cache whose heads hold different tokens (``head_budget``'s
per-head storage): one helper both runtimes use, the torch attention function and the
exported graph (``formats/onnx/policy_io.py``)."""

from __future__ import annotations

import torch

from knowpress.core.errors import KnowpressError


def head_mask(stored: torch.Tensor, mask: torch.Tensor | None,
              query: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``[B, H_q, q, S + q]`` bool: ``stored [B, H_kv, S]`` (live, real) over the stored
    slots, the model's mask (its last q columns: causal, padding) over the new tokens."""
    b, heads, q, _ = query.shape
    group = torch.arange(heads, device=stored.device) // (heads // stored.shape[1])
    old = stored.index_select(1, group)[:, :, None, :]  # a gather: exports with an empty past
    if mask is None:  # sdpa skipped the mask: no padding, causal within the new tokens
        new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
    elif mask.dtype != torch.bool:
        raise KnowpressError("head_budget: attention masks must be boolean (sdpa's)")
    else:
        new = mask[..., -q:]
    full = torch.cat([old.expand(b, heads, q, old.shape[-1]), new.expand(b, heads, q, q)], dim=-1)
    return full | ~full.any(-1, keepdim=True)  # a query with no key (a pad): as sdpa_mask
