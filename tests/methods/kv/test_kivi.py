"""KIVI: SQNR floors on random K/V, the promised bytes after prefill and decoding (packed
codes + fp16 scales/zeros + the full-precision residual), exact while everything is residual."""

from __future__ import annotations

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.kv.kivi import KIVILayer
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _sqnr(x: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - approx).pow(2).sum()))


@pytest.mark.parametrize(("bits", "floor"), [(2, 7.5), (3, 14.5), (4, 21.0)])
def test_sqnr_floors_on_random_keys_and_values(bits: int, floor: float) -> None:
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 4, 64, 32, generator=g), torch.randn(2, 4, 64, 32, generator=g)
    keys[..., 3] *= 10  # an outlier channel: per-channel key scales absorb it
    layer = KIVILayer(bits, 32, residual=0)
    layer.update(keys, values)
    read_k, read_v = layer.update(torch.zeros(2, 4, 0, 32), torch.zeros(2, 4, 0, 32))
    assert _sqnr(keys, read_k) >= floor and _sqnr(values, read_v) >= floor
    assert layer.keys.shape[-2] == 0 and layer.get_seq_length() == 64


def test_the_cache_holds_the_promised_bytes_after_decoding() -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    policy = KV_POLICIES.get("kivi")(name="kivi", bits=2, group_size=4, residual=3)
    ids = tokenizer(["w1 w2 w3 w4 w5 w6 w7 w8 w9"], return_tensors="pt")["input_ids"]
    cache = policy.make_cache(model)
    with torch.inference_mode():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    seen = out.shape[1] - 1
    c = model.config
    heads, d = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    quantized = (seen - 3) // 4 * 4  # whole groups beyond the residual
    residual = seen - quantized
    per_layer = (2 * heads * quantized * d * 2 // 8  # K and V codes, 2 bits
                 + 2 * 2 * heads * (quantized // 4) * d  # key scale + zero per block and channel
                 + 2 * 2 * heads * quantized * (d // 4)  # value scale + zero per token and group
                 + 2 * heads * residual * d * 4)  # fp32 residual K and V  # fmt: skip
    assert policy.cache_bytes(cache) == c.num_hidden_layers * per_layer
    # deployed in bfloat16: the residual at 2 bytes a value, codes and fp16 scales unchanged
    deployed = per_layer - 2 * heads * residual * d * 2
    assert policy.cache_bytes(cache, float_bytes=2) == c.num_hidden_layers * deployed
    assert all(layer.get_seq_length() == seen for layer in cache.layers)


def test_a_residual_holding_everything_is_exact() -> None:
    from knowpress.runtimes.torch import TorchRuntime

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    prompts = ["w1 w2 w3 w4 w5", "w9 w8"]
    policy = KV_POLICIES.get("kivi")(name="kivi", bits=2, group_size=4, residual=64)
    assert TorchRuntime(model, tokenizer, kv_policy=policy).greedy(prompts, 6) == TorchRuntime(
        model, tokenizer).greedy(prompts, 6)  # fmt: skip


def test_a_group_size_not_dividing_the_head_dim_is_one_line() -> None:
    policy = KV_POLICIES.get("kivi")(name="kivi", group_size=5)
    with pytest.raises(KnowpressError, match="group_size 5 does not divide the head dim"):
        policy.make_cache(tiny_llama())


@pytest.mark.parametrize(
    "block",
    [{"name": "kivi", "bits": 2, "group_size": 4, "residual": 0},
     {"name": "gear", "bits": 2, "group_size": 4, "residual": 0, "rank": 1, "outliers": 0.05}],
)  # fmt: skip
def test_pads_never_enter_the_quantized_ranges(block: dict) -> None:
    """Two batches that differ only in what their pads hold read back the same real tokens:
    a row's codes do not depend on its batch's padding."""
    from knowpress.methods.kv import policy_from_json
    from knowpress.methods.kv.base import CacheShape
    from knowpress.methods.kv.evicting import PolicyCache

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False  # row 1: three pads, then five real tokens
    reads = []
    for garbage in (0.0, 50.0):
        k, v = keys.clone(), values.clone()
        k[1, :, :3], v[1, :, :3] = garbage, -garbage
        policy = policy_from_json(block, "t")
        cache = PolicyCache(policy.layers(CacheShape(1, 16, 32)))
        cache.valid = valid
        cache.layers[0].update(k, v)
        assert cache.layers[0].chunks  # everything was quantized
        reads.append(cache.layers[0].past())
    (k0, v0, _), (k1, v1, _) = reads
    assert torch.equal(k0[1, :, 3:], k1[1, :, 3:]) and torch.equal(v0[1, :, 3:], v1[1, :, 3:])
    assert torch.equal(k0[0], k1[0]) and _sqnr(keys[1, :, 3:], k0[1, :, 3:]) > 3
