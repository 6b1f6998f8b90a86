"""H2O: the accumulated attention it recomputes equals eager attention's weights, and each
KV head keeps its recent window plus heavy hitters."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import MODELS, generate, left_padded, sharpen

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv import KV_POLICIES
from knowpress.testing.models import tiny_moe


@torch.inference_mode()
def test_the_recomputed_attention_equals_eager_attention_weights() -> None:
    model = sharpen(MODELS["llama"]())
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = KV_POLICIES.get("h2o")(name="h2o", budget=64).make_cache(model)
    out = model(input_ids=ids, past_key_values=cache, output_attentions=True)
    for layer, weights in zip(cache.layers, out.attentions, strict=True):  # [B, Hq, q, S]
        groups = weights.shape[1] // layer.score.shape[1]
        expected = weights.view(1, -1, groups, 12, 12).sum((2, 3))
        assert torch.allclose(layer.score, expected, atol=1e-5)


@torch.inference_mode()
def test_each_head_keeps_its_recent_window_and_heavy_hitters() -> None:
    model = sharpen(MODELS["llama"]())
    ids, mask = left_padded([20, 13])
    cache = KV_POLICIES.get("h2o")(name="h2o", budget=8, recent=0.5).make_cache(model)
    generate(model, ids, mask, cache, n=6)
    seen = ids.shape[1] + 5
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 and layer.score.shape[-1] == 8
        for row in layer.pos.reshape(-1, 8).tolist():
            assert row[-4:] == list(range(seen - 4, seen))  # the recent window, every head
        assert (layer.pos[1] >= 7).all()  # row 1's 7 pads are gone first


def test_an_architecture_without_recomputable_attention_is_one_line() -> None:
    model = tiny_moe("olmoe")
    with pytest.raises(KnowpressError, match="model_type 'olmoe' is not one of them"):
        KV_POLICIES.get("h2o")(name="h2o").make_cache(model)


@torch.inference_mode()
def test_beam_search_reorders_the_per_token_state() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    cache = KV_POLICIES.get("h2o")(name="h2o", budget=6).make_cache(model)
    out = model.generate(ids, past_key_values=cache, num_beams=2, max_new_tokens=5,
                         min_new_tokens=5, do_sample=False, pad_token_id=0)  # fmt: skip
    assert out.shape == (1, 15)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.pos.shape[0] == layer.score.shape[0] == 2  # the beams
