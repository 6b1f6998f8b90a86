"""Head importance from retrieval (copy) probes and HeadKV-style budget allocation, for the
``head_budget`` KV policy (``head_budget.py``).

Importance (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv:2404.15574): a retrieval head attends to the token it is about to copy.
The probe is the induction / copy test: ``x = r ‖ r`` with ``r`` a random sequence of ``L``
distinct tokens. A query at position ``i ∈ [L, 2L)`` (second copy) reads the token ``x_i =
r_{i−L}``, whose continuation sits at ``j = i − L + 1`` in the first copy. For layer ``l``
and KV head ``h`` (with ``G`` query heads ``g``)::

    s_{l,h} = mean_{probes, i ∈ [L, 2L), g} softmax(q_{i,g} · Kᵀ · scaling)_{i − L + 1}

from one probe forward of the runtime (``Probe``: on torch the queries are recomputed from
the hooked attention inputs, ``attention.queries``; the exported graph outputs them), so the
model keeps its attention implementation and both runtimes score heads alike.

Allocation (HeadKV, Fu et al. 2024, "Not All Heads Matter: A Head-Level KV Cache
Compression Method with Integrated Retrieval and Reasoning", arXiv:2410.19258): with ``N``
heads (all layers × KV heads), an average budget ``c`` and a ``floor`` share, head ``n``
gets ``floor · c + (1 − floor) · c · N · s_n / Σ s`` tokens, rounded by largest remainder so
the budgets sum to exactly ``c · N``, each at least 1.
"""

from __future__ import annotations

from typing import Any

import torch

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv.attention import attend, attention_modules, queries
from knowpress.methods.kv.base import CacheShape, Probe, ProbeResult

SCORES = "_knowpress_head_importance"  # on a model: {(probes, length): [layers, kv_heads]}


def probe_ids(shape: CacheShape, probes: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[probes, 2·length]`` token ids: ``length`` distinct non-special tokens, twice."""
    check_probe(shape, length)
    allowed = torch.tensor([t for t in range(shape.vocab_size) if t not in shape.special_ids])
    generator = torch.Generator().manual_seed(seed)
    rows = [allowed[torch.randperm(len(allowed), generator=generator)[:length]]
            for _ in range(probes)]  # fmt: skip
    first = torch.stack(rows)
    return torch.cat([first, first], dim=1)


def check_probe(shape: CacheShape, length: int) -> None:
    """The probes fit the model: ``2·length`` positions, ``length`` distinct tokens."""
    limit = shape.max_positions
    if limit is not None and 2 * length > limit:
        raise KnowpressError(
            f"head_budget: probe_length {length} makes {2 * length}-token probes, past the "
            f"model's max_position_embeddings {limit}; lower probe_length"
        )
    usable = shape.vocab_size - len([t for t in shape.special_ids if t < shape.vocab_size])
    if length > usable:
        raise KnowpressError(
            f"head_budget: probe_length {length} exceeds the {usable} non-special tokens "
            "of the vocabulary (a probe's tokens are distinct); lower probe_length"
        )


def torch_probe(model: Any) -> Probe:
    """A ``Probe`` on a torch model: one forward with hooks on each attention module, the
    queries recomputed from its inputs (``attention.queries``); the memo lives on the model."""

    @torch.inference_mode()
    def run(ids: torch.Tensor) -> ProbeResult:
        from transformers import DynamicCache

        modules = attention_modules(model, "head_budget")
        inputs: dict[int, tuple[torch.Tensor, Any]] = {}

        def stash(module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

        handles = [m.register_forward_pre_hook(stash, with_kwargs=True) for m in modules]
        cache = DynamicCache(config=model.config)
        try:
            model.model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        out = []
        for index, module in enumerate(modules):
            keys = cache.layers[index].keys
            hidden, rotary = inputs[index]
            out.append((queries(module, hidden, rotary, keys.shape[1]), keys, module.scaling))
        return out

    return Probe(run, model.__dict__.setdefault(SCORES, {}))


@torch.inference_mode()
def retrieval_scores(probe: Probe, shape: CacheShape, probes: int, length: int,
                     seed: int = 0) -> torch.Tensor:  # fmt: skip
    """``[layers, kv_heads]`` float32 (CPU): the copy score ``s_{l,h}`` of each KV head, from
    one probe forward of the runtime (torch or the exported graph)."""
    ids = probe_ids(shape, probes, length, seed)
    p, n = ids.shape
    query_pos = torch.arange(length, n).expand(p, length)  # second copy
    target = (query_pos - length + 1)[:, None, :, None]  # [P, 1, L, 1]: the token to copy
    scores = []
    for states, keys, scaling in probe.run(ids):
        keys = keys.float().cpu()
        states = states.float().cpu()[:, :, :, length:]  # [P, H_kv, G, L, D]
        heads = keys.shape[1]
        key_pos = torch.arange(n).expand(p, heads, n)
        every = torch.ones_like(key_pos, dtype=torch.bool)
        probs = attend(states, scaling, keys, query_pos, key_pos, every)  # [P, H, L, 2L]
        copied = probs.gather(-1, target.expand(p, heads, length, 1))[..., 0]
        scores.append(copied.mean((0, 2)) / states.shape[2])  # mean over probes, i and G
    return torch.stack(scores).float()


def allocate(importance: torch.Tensor, capacity: int, floor: float,
             cap: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[layers, kv_heads]`` int64 budgets from ``importance [layers, kv_heads]`` (≥ 0):
    ``floor · c + (1 − floor) · c · N · s / Σ s``, largest-remainder rounded to sum exactly
    ``c · N``, each ≥ 1 (all-zero importance: uniform). With ``cap`` (the tokens a head can
    hold: those seen) no head gets more; what a capped head cannot use goes to the others in
    proportion to their shares (water-filling), so the average stays ``c`` while it fits."""
    flat = importance.flatten().double().clamp_min(0)
    n = flat.numel()
    share = flat / flat.sum() if flat.sum() > 0 else torch.full_like(flat, 1.0 / n)
    ideal = floor * capacity + (1 - floor) * capacity * n * share
    total = capacity * n if cap is None else min(capacity, cap) * n
    if cap is not None:
        ideal = _water_fill(ideal, float(cap))
    budget = ideal.floor().long().clamp_min(1)
    rest = total - int(budget.sum())
    if rest > 0:  # the largest fractional parts get the tokens rounding dropped
        budget[(ideal - budget).topk(rest).indices] += 1
    while rest < 0:  # heads raised to 1 token: take them from the largest budgets
        budget[budget.argmax()] -= 1
        rest += 1
    return budget.view_as(importance)


def _water_fill(ideal: torch.Tensor, cap: float) -> torch.Tensor:
    """``ideal`` with every value above ``cap`` cut to it and the excess spread over the
    others in proportion to their values, repeated until none exceeds ``cap``."""
    ideal = ideal.clone()
    for _ in range(ideal.numel()):
        over = ideal > cap
        free = ~over & (ideal < cap)
        if not over.any() or not free.any():
            return ideal.clamp_max(cap)
        excess = float((ideal[over] - cap).sum())
        ideal[over] = cap
        weight = ideal[free] if float(ideal[free].sum()) > 0 else torch.ones_like(ideal[free])
        ideal[free] += excess * weight / weight.sum()
    return ideal.clamp_max(cap)
