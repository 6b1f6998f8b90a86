"""compose: an eviction policy's tokens in KIVI storage. With a budget holding everything it
is KIVI exactly; with a smaller one it holds the budget, and the bytes multiply down."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import MODELS, generate, left_padded, sharpen

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv import KV_POLICIES, policy_from_json

KIVI = {"name": "kivi", "bits": 2, "group_size": 4, "residual": 3}


def _compose(eviction: dict) -> object:
    return KV_POLICIES.get("compose").model_validate(
        {"name": "compose", "policies": [eviction, KIVI]})  # fmt: skip


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_a_budget_holding_everything_is_kivi_exactly(arch: str) -> None:
    model = sharpen(MODELS[arch]())
    ids, mask = left_padded([20, 13, 7])
    composed = _compose({"name": "h2o", "budget": 64}).make_cache(model)
    kivi = KV_POLICIES.get("kivi").model_validate(KIVI).make_cache(model)
    assert torch.equal(generate(model, ids, mask, composed), generate(model, ids, mask, kivi))
    for ours, theirs in zip(composed.layers, kivi.layers, strict=True):
        history = sum(chunk[0][1].shape[2] for chunk in theirs.chunks) * 4  # key blocks x 4
        assert ours.history() == history and torch.equal(ours.keys, theirs.keys)
        # the same codes and scales, plus one uint8 key-block id per history token and head
        assert ours.nbytes() == theirs.nbytes() + ours.kblock.numel()


@torch.inference_mode()
def test_the_cache_holds_its_budget_and_the_bytes_multiply_down() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(12))
    kivi, snap = {**KIVI, "residual": 0}, {"name": "snapkv", "budget": 16, "window": 3, "kernel": 3}
    policies = {name: policy_from_json(block, name) for name, block in {
        "full": {"name": "full"}, "kivi": kivi, "snapkv": snap,
        "compose": {"name": "compose", "policies": [snap, kivi]}}.items()}  # fmt: skip
    caches = {name: p.make_cache(model) for name, p in policies.items()}
    for cache in caches.values():
        generate(model, ids, torch.ones_like(ids), cache, n=8)
    for layer in caches["compose"].layers:
        assert layer.stored() == 16 and layer.pos.shape[-1] == 16
        assert layer.keys.shape[-2] < 4  # the full-precision tail: less than one group
        assert layer.kblock.dtype == torch.uint8
        assert int(layer.kblock.max()) < layer.kscale.shape[2]  # compacted block ids
    share = {name: policies[name].cache_bytes(c) / policies["full"].cache_bytes(caches["full"])
             for name, c in caches.items()}  # fmt: skip
    # the full-precision tail and the block ids keep it a little above the product
    assert share["compose"] < 1.5 * share["snapkv"] * share["kivi"]


@torch.inference_mode()
def test_history_reads_back_close_to_the_tokens_it_kept() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(13))
    full = KV_POLICIES.get("full")(name="full").make_cache(model)
    model(input_ids=ids, past_key_values=full)
    cache = _compose({"name": "streaming", "sinks": 2, "budget": 16}).make_cache(model)
    model(input_ids=ids, past_key_values=cache)
    for ours, reference in zip(cache.layers, full.layers, strict=True):
        keys, _ = ours.dequantized(torch.float32)
        kept = reference.keys.gather(2, ours.pos[..., : ours.history(), None].expand_as(keys))
        err = (keys - kept).pow(2).sum() / kept.pow(2).sum()
        assert float(err) < 0.2  # 2-bit codes: SQNR above 7 dB


def test_members_and_budgets_are_one_line() -> None:
    with pytest.raises(KnowpressError, match=r"\[an eviction policy, kivi\] in that order"):
        policy_from_json({"name": "compose", "policies": [KIVI, {"name": "h2o"}]}, "policy")
    with pytest.raises(KnowpressError, match="two policies"):
        policy_from_json({"name": "compose", "policies": [KIVI]}, "policy")
    composed = _compose({"name": "snapkv", "budget": 64}).with_budget(0.25)
    assert composed.eviction.budget == 0.25 and composed.storage.bits == 2
    with pytest.raises(KnowpressError, match="kivi evicts nothing"):
        KV_POLICIES.get("kivi").model_validate(KIVI).with_budget(0.5)
    saved = policy_from_json(composed.model_dump(), "manifest")
    assert saved == composed
