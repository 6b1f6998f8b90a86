"""R-KV: redundancy is the softmax of mean key cosine similarity; the cache grows to
budget + buffer and is recompressed back to budget."""

from __future__ import annotations

import math

import torch
from kv_helpers import MODELS, generate, sharpen

from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.kv.rkv import redundancy


def test_redundancy_matches_hand_computed_similarities() -> None:
    # keys e1, e1, e2 and a pad: the two e1 keys are alike (mean cos 0.5), e2 unlike (0)
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]).view(1, 1, 4, 2)
    valid = torch.tensor([True, True, True, False]).view(1, 1, 4)
    got = redundancy(keys, valid)[0, 0]
    e = [math.exp(0.5), math.exp(0.5), math.exp(0.0)]
    assert torch.allclose(got, torch.tensor([x / sum(e) for x in e] + [0.0]), atol=1e-6)


@torch.inference_mode()
def test_the_cache_is_recompressed_every_buffer_tokens() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(10))
    policy = KV_POLICIES.get("rkv")(name="rkv", budget=8, buffer=3, window=2)
    cache = policy.make_cache(model)
    model(input_ids=ids, past_key_values=cache)
    sizes = [cache.layers[0].keys.shape[-2]]
    token = ids[:, -1:]
    for _ in range(8):
        model(input_ids=token, past_key_values=cache)
        sizes.append(cache.layers[0].keys.shape[-2])
    assert sizes == [8, 9, 10, 11, 8, 9, 10, 11, 8]
    seen = cache.layers[0].get_seq_length()
    assert cache.layers[0].pos[0, 0, -2:].tolist() == [seen - 2, seen - 1]  # the window


@torch.inference_mode()
def test_lambda_one_is_snapkv_with_max_pooling() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(11))
    rkv = KV_POLICIES.get("rkv")(name="rkv", budget=6, buffer=0, lam=1.0, window=3, kernel=3)
    snap = KV_POLICIES.get("snapkv")(name="snapkv", budget=6, window=3, kernel=3)
    caches = [rkv.make_cache(model), snap.make_cache(model)]
    outs = [generate(model, ids, torch.ones_like(ids), c, n=5) for c in caches]
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.pos, b.pos)
