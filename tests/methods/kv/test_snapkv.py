"""SnapKV: each KV head keeps its observation window and the tokens the window's eager
attention votes for most; the cache stays at its budget while decoding."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import MODELS, generate, left_padded, sharpen

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv import KV_POLICIES


@torch.inference_mode()
def test_prefill_keeps_the_window_and_the_eager_attention_top_votes() -> None:
    model = sharpen(MODELS["llama"]())
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(8))
    policy = KV_POLICIES.get("snapkv")(name="snapkv", budget=6, window=3, kernel=1)
    cache = policy.make_cache(model)
    out = model(input_ids=ids, past_key_values=cache, output_attentions=True)
    for layer, weights in zip(cache.layers, out.attentions, strict=True):  # [1, Hq, 12, 12]
        heads = layer.pos.shape[1]
        votes = weights[0, :, -3:, :].reshape(heads, -1, 3, 12).sum((1, 2))  # [H_kv, 12]
        for h in range(heads):
            top = votes[h, :9].topk(3).indices.tolist()
            assert layer.pos[0, h].tolist() == sorted([*top, 9, 10, 11])


@torch.inference_mode()
def test_the_cache_stays_at_its_budget_while_decoding() -> None:
    model = sharpen(MODELS["mixtral"]())
    ids, mask = left_padded([20, 13])
    policy = KV_POLICIES.get("snapkv")(name="snapkv", budget=8, window=3, kernel=3)
    cache = policy.make_cache(model)
    generate(model, ids, mask, cache, n=6)
    seen = ids.shape[1] + 5
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 and layer.get_seq_length() == seen
        for row in layer.pos.reshape(-1, 8).tolist():  # the sliding window, every head
            assert row[-3:] == list(range(seen - 3, seen))
        assert (layer.pos[1] >= 7).all()  # row 1's pads went first


@torch.inference_mode()
def test_a_ratio_budget_keeps_that_share_of_the_tokens_seen() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(9))
    cache = KV_POLICIES.get("snapkv")(name="snapkv", budget=0.25, window=2).make_cache(model)
    generate(model, ids, torch.ones_like(ids), cache, n=5)
    assert cache.layers[0].keys.shape[-2] == 6  # ceil(0.25 * 24 seen)


def test_an_even_kernel_is_one_line() -> None:
    with pytest.raises(Exception, match="kernel must be odd"):
        KV_POLICIES.get("snapkv").model_validate({"name": "snapkv", "kernel": 4})


def test_a_model_without_recomputable_attention_is_one_line() -> None:
    from knowpress.testing.models import tiny_moe

    with pytest.raises(KnowpressError, match="model_type 'olmoe'"):
        KV_POLICIES.get("snapkv")(name="snapkv").make_cache(tiny_moe("olmoe"))
