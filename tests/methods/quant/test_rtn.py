"""RTN: SQNR floors, exact packing round trips, real byte shrinkage on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowpress.formats import load_model, save_model, stored_bytes
from knowpress.methods.quant import QuantLinear
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.tensors.packing import (
    dequantize_groups,
    pack,
    quantize_groups,
    sqnr_db,
    unpack,
)
from knowpress.testing.models import tiny_llama, tiny_tokenizer

# (bits, group_size, symmetric) -> SQNR floor in dB on N(0, 1) weights. Theory for uniform
# b-bit RTN is ~6.02·b dB minus a few dB for the range of a Gaussian group.
FLOORS = [
    (8, 32, False, 42.0),
    (8, 128, True, 38.0),
    (4, 32, False, 19.0),
    (4, 128, False, 16.5),
    (4, 32, True, 16.0),
]


@pytest.mark.parametrize(("bits", "group", "symmetric", "floor"), FLOORS)
def test_sqnr_floor(bits: int, group: int, symmetric: bool, floor: float) -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    q = quantize_groups(w, bits, group, symmetric)
    w_hat = dequantize_groups(q.codes, q.scales, q.zeros, bits, group)
    assert sqnr_db(w, w_hat) > floor
    assert int(q.codes.max()) <= 2**bits - 1


def test_more_bits_and_smaller_groups_help() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))

    def db(bits: int, group: int) -> float:
        q = quantize_groups(w, bits, group, symmetric=False)
        return sqnr_db(w, dequantize_groups(q.codes, q.scales, q.zeros, bits, group))

    assert db(8, 64) > db(4, 64) + 20
    assert db(4, 32) > db(4, 256)


@pytest.mark.parametrize(("bits", "width"), [(4, 64), (8, 64), (4, 5), (8, 5)])
def test_pack_unpack_exact(bits: int, width: int) -> None:
    codes = torch.randint(0, 2**bits, (16, width), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (16, -(-width * bits // 8))  # an odd 4-bit row gets one pad nibble
    assert torch.equal(unpack(packed, bits, width), codes)


def test_int4_zero_points_are_packed_two_per_byte() -> None:
    linear = torch.nn.Linear(96, 8)  # 3 groups of 32: an odd count of zero points
    q = RTN(name="rtn", bits=4, group_size=32, symmetric=False).quantize_linear(linear)
    assert q.weight_zero_point is not None and q.weight_zero_point.shape == (8, 2)
    expected = quantize_groups(linear.weight, 4, 32, symmetric=False)
    assert torch.equal(q.dequantized_weight(), dequantize_groups(
        expected.codes, expected.scales, expected.zeros, 4, 32))  # fmt: skip


def test_symmetric_uses_the_full_signed_range() -> None:
    # s = max|W| / ((2^b - 1) / 2) = 1 at 3 bits; ±3.5 round to the end levels -4 and 3.
    w = torch.tensor([[-3.5, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 3.5]])
    q = quantize_groups(w, 3, 8, symmetric=True)
    assert q.zeros is None and torch.equal(q.scales.float(), torch.ones(1, 1))
    w_hat = dequantize_groups(q.codes, q.scales, q.zeros, 3, 8)
    assert torch.equal(w_hat, torch.tensor([[-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 3.0]]))


def test_exact_values_survive() -> None:
    # Values on the quantization grid (and zeros) must come back exactly.
    w = torch.zeros(4, 32)
    w[:, :8] = torch.linspace(-1, 1, 8)
    q = quantize_groups(w, 8, 32, symmetric=False)
    w_hat = dequantize_groups(q.codes, q.scales, q.zeros, 8, 32)
    assert torch.equal(w_hat[:, 8:], torch.zeros(4, 24))


def test_quant_linear_matches_dequantized_linear() -> None:
    linear = torch.nn.Linear(64, 32, bias=True)
    q = RTN(name="rtn", bits=4, group_size=32).quantize_linear(linear)
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, q.dequantized_weight(), linear.bias)
    assert torch.allclose(q(x), expected)
    assert q.logical_parameters() == 64 * 32 + 32


def test_group_size_must_divide() -> None:
    problem = RTN(name="rtn", bits=4, group_size=64).check_linear("layer", 8, 96)
    assert problem is not None and "does not divide in_features 96" in problem
    assert RTN(name="rtn", bits=4, group_size=None).check_linear("layer", 8, 96) is None


@pytest.mark.parametrize(("bits", "max_ratio"), [(8, 0.62), (4, 0.45)])
def test_stored_bytes_shrink_and_reload_exactly(
    tmp_path: Path, bits: int, max_ratio: float
) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(hidden_size=128, intermediate_size=256, vocab_size=128)
    save_model(model, tokenizer, tmp_path / "fp", dtype=torch.bfloat16)
    method = RTN(name="rtn", bits=bits, group_size=32)
    for target in select(model, None, ["lm_head"]):
        linear = model.get_submodule(target.module)
        model.set_submodule(target.module, method.quantize_linear(linear))
    save_model(model, tokenizer, tmp_path / "q", dtype=torch.bfloat16)
    ratio = stored_bytes(tmp_path / "q") / stored_bytes(tmp_path / "fp")
    assert ratio < max_ratio  # embeddings stay bf16; linear layers shrink ~2x / ~4x vs bf16

    reloaded, _ = load_model(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in reloaded.modules())
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.bfloat16())
        for norm in [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]:
            norm.weight.copy_(norm.weight.bfloat16())  # what the bf16 folder stores
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
