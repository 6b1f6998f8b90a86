"""GEAR: rank 0 without outliers is KIVI exactly; the low-rank fix and the outliers raise
SQNR; outliers are restored exactly; the byte count is what is stored."""

from __future__ import annotations

import pytest
import torch

from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.kv.gear import GEARLayer, add_outliers, split_outliers
from knowpress.methods.kv.kivi import KIVILayer
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 4, 64, 32, generator=g), torch.randn(2, 4, 64, 32, generator=g)
    keys[..., 3] *= 10
    values[0, 1, 5, 7] = 40.0  # a lone outlier entry
    return keys, values


def _read(layer: KIVILayer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.update(keys, values)
    return layer.update(torch.zeros(2, 4, 0, 32), torch.zeros(2, 4, 0, 32))


def _sqnr(x: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - approx).pow(2).sum()))


def test_rank_zero_without_outliers_is_kivi() -> None:
    keys, values = _kv()
    gear = _read(GEARLayer(2, 32, 0, rank=0, outliers=0.0), keys, values)
    kivi = _read(KIVILayer(2, 32, 0), keys, values)
    assert all(torch.equal(a, b) for a, b in zip(gear, kivi, strict=True))
    assert GEARLayer(2, 32, 0, 0, 0.0).nbytes() == 0


@pytest.mark.parametrize(("bits", "floor"), [(2, 11.0), (4, 24.0)])
def test_low_rank_and_outliers_beat_plain_quantization(bits: int, floor: float) -> None:
    keys, values = _kv()
    plain = _read(KIVILayer(bits, 32, 0), keys, values)
    gear = _read(GEARLayer(bits, 32, 0, rank=4, outliers=0.02), keys, values)
    for x, p, q in zip((keys, values), plain, gear, strict=True):
        assert _sqnr(x, q) > _sqnr(x, p) and _sqnr(x, q) >= floor


def test_outliers_are_split_and_restored_exactly() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2], x[0, 0, 3, 0] = 9.0, -7.0
    inliers, sparse = split_outliers(x, 2 / 16)
    assert sparse is not None and inliers.abs().max() == 0
    assert sorted(sparse[1][0, 0].tolist()) == [1 * 4 + 2, 3 * 4 + 0]
    assert torch.equal(add_outliers(inliers, sparse), x)


def test_the_cache_holds_the_promised_bytes() -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    policy = KV_POLICIES.get("gear")(name="gear", bits=2, rank=2, outliers=0.1, group_size=4,
                                     residual=3)  # fmt: skip
    ids = tokenizer(["w1 w2 w3 w4 w5 w6 w7 w8 w9"], return_tensors="pt")["input_ids"]
    cache = policy.make_cache(model)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache)
    c = model.config
    heads, d, n = c.num_key_value_heads, c.hidden_size // c.num_attention_heads, ids.shape[1]
    quantized = (n - 3) // 4 * 4
    kivi = KV_POLICIES.get("kivi")(name="kivi", bits=2, group_size=4, residual=3)
    plain = kivi.make_cache(model)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=plain)
    k = int(0.1 * quantized * d)
    extra = 2 * heads * (2 * (quantized * 2 + 2 * d)  # A [n, 2] and B [2, d] in fp16
                         + k * (2 + 2))  # fp16 value + int16 index per outlier  # fmt: skip
    assert policy.cache_bytes(cache) == kivi.cache_bytes(plain) + c.num_hidden_layers * extra
