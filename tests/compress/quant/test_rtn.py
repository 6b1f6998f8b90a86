"""RTN: SQNR floors, exact packing round trips, real byte shrinkage on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from knowpress.compress.quant import QUANT_METHODS, QuantLinear
from knowpress.compress.quant.packing import (
    dequantize_groups,
    pack,
    quantize_groups,
    sqnr_db,
    unpack,
)
from knowpress.compress.quant.rtn import RTN
from knowpress.models.io import load_model, save_model, stored_bytes
from knowpress.testing.models import tiny_llama

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


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (16, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (16, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


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
    linear = torch.nn.Linear(96, 8)
    problem = RTN(name="rtn", bits=4, group_size=64).check_module("layer", linear)
    assert problem is not None and "does not divide in_features 96" in problem
    assert RTN(name="rtn", bits=4, group_size=None).check_module("layer", linear) is None


def _tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(124)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize(("bits", "max_ratio"), [(8, 0.62), (4, 0.45)])
def test_stored_bytes_shrink_and_reload_exactly(
    tmp_path: Path, bits: int, max_ratio: float
) -> None:
    from knowpress.stages.quantize import select_targets

    tokenizer = _tokenizer(tmp_path)
    model = tiny_llama(hidden_size=128, intermediate_size=256, vocab_size=128)
    save_model(model, tokenizer, tmp_path / "fp")
    method = RTN(name="rtn", bits=bits, group_size=32)
    targets = select_targets(model, ["lm_head"])
    for name, linear in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, method.quantize_linear(linear))
    save_model(model, tokenizer, tmp_path / "q")
    ratio = stored_bytes(tmp_path / "q") / stored_bytes(tmp_path / "fp")
    assert ratio < max_ratio  # embeddings stay float; linear layers shrink ~4x / ~8x

    reloaded, _ = load_model(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in reloaded.modules())
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_registry_matrix_covers_every_method() -> None:
    # Adding a quant method = its file + one import line + one row here.
    assert set(QUANT_METHODS.names()) == {"rtn"}


def test_fused_moe_experts_are_counted_not_silently_skipped() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from knowpress.stages.quantize import fused_expert_parameters, select_targets

    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    fused = fused_expert_parameters(model)
    assert fused == 4 * (2 * 64 * 32 + 32 * 64)  # gate_up_proj + down_proj per expert
    assert all(t.weight.dim() == 2 for t in select_targets(model, ["lm_head"]).values())
    assert fused_expert_parameters(tiny_llama()) == 0
