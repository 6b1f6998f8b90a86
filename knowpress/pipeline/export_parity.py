"""Parity after export: the graph against the PyTorch model it came from, on fixed prompts.

Prompts: ``prompts`` seeded random token sequences (``<bos>`` + 4..4+3·i ids), left-padded
into one batch. PyTorch decodes ``new_tokens`` greedy tokens with its KV cache; the graph
is fed the same tokens (so every step compares the same inputs: prefill, then decode at past
lengths prompt, prompt+1, ...) and

    max_abs = max |logits_onnx - logits_torch|  over real positions of prefill and decode,
    max_rel = max_abs / max |logits_torch|,

then the graph decodes greedily on its own and its tokens must equal PyTorch's. Gated by
``max_rel`` (default 1e-4 when the graph computes in float32, 0.05 where int4 matmuls round
activation blocks to int8 (``accuracy_level`` 4), 0.15 for int8 dynamic (one activation
scale per tensor); ``pipeline.DEFAULT_MAX_REL``) and, unless turned off, greedy equality.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError
from knowpress.runtimes.ort_session import OnnxDecoder, left_padded


def prompts(count: int, vocab: int, bos: int | None, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    low = min(4, vocab - 1)  # skip the usual special ids
    rows = []
    for i in range(count):
        ids = torch.randint(low, vocab, (4 + 3 * i,), generator=gen).tolist()
        rows.append(([bos] if bos is not None else []) + ids)
    return rows


@torch.no_grad()
def torch_greedy(
    model: Any, rows: list[list[int]], steps: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-step logits ``[B, S, V]`` (prefill, then each decode step) and the greedy tokens
    ``[B, steps]`` of the PyTorch model, positions and mask as ``session.py`` builds them."""
    from transformers import DynamicCache

    ids, valid = (torch.from_numpy(a) for a in left_padded(rows, 0))
    mask, seen = valid, torch.zeros(len(rows), dtype=torch.long)
    cache, out, tokens = DynamicCache(config=model.config), [], []
    for _ in range(steps + 1):
        pos = (seen[:, None] + valid.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).logits.float()
        out.append(logits.numpy())
        seen = seen + valid.sum(-1)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids[:, 0].numpy())
        valid = torch.ones_like(ids)
        mask = torch.cat([mask, valid], dim=1)
    return out, np.stack(tokens[:steps], axis=1)


def measure(model: Any, decoder: OnnxDecoder, count: int, steps: int) -> dict[str, Any]:
    spec = decoder.spec
    rows = prompts(count, spec["vocab_size"], spec["bos_token_id"])
    reference, tokens = torch_greedy(model, rows, steps)
    ids, valid = left_padded(rows, 0)
    state, worst, scale = decoder.empty(len(rows)), 0.0, 0.0
    for step, ref in enumerate(reference):
        logits, state = decoder.forward(ids, valid, state)
        real = valid.astype(bool)
        worst = max(worst, float(np.abs(logits - ref)[real].max()))
        scale = max(scale, float(np.abs(ref)[real].max()))
        if step < steps:
            ids, valid = tokens[:, step : step + 1], np.ones((len(rows), 1), np.int64)
    own = _onnx_greedy(decoder, rows, steps)
    return {
        "prompts": count,
        "new_tokens": steps,
        "max_abs_logits": worst,
        "max_rel_logits": worst / max(scale, 1e-12),
        "greedy_equal": bool((own == tokens).all()),
        "greedy_agreement": float((own == tokens).mean()),
    }


def _onnx_greedy(decoder: OnnxDecoder, rows: list[list[int]], steps: int) -> np.ndarray:
    ids, valid = left_padded(rows, 0)
    state, out = decoder.empty(len(rows)), []
    for _ in range(steps):
        logits, state = decoder.forward(ids, valid, state)
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        valid = np.ones_like(ids)
        out.append(ids[:, 0])
    return np.stack(out, axis=1)


def failure(result: dict[str, Any], max_rel: float, greedy: bool) -> str | None:
    """Why the exported graph does not compute what PyTorch computes, or None."""
    if result["max_rel_logits"] > max_rel:
        return (
            f"max |Δlogits| {result['max_abs_logits']:.3g} is "
            f"{result['max_rel_logits']:.3g} of the logit scale, above parity.max_rel_logits "
            f"{max_rel:g}; the exported graph does not compute what the PyTorch model does"
        )
    if greedy and not result["greedy_equal"]:
        return (
            "greedy tokens differ from PyTorch (agreement "
            f"{result['greedy_agreement']:.3f}); set parity.greedy_equal: false to accept it"
        )
    return None


def gate(result: dict[str, Any], max_rel: float, greedy: bool) -> None:
    """One line when the exported graph does not compute what PyTorch computes."""
    problem = failure(result, max_rel, greedy)
    if problem:
        raise KnowpressError(f"parity: {problem}")
