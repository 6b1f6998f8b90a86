"""The code grids (tensors/grids.py): rounding as compressed-tensors rounds, the stored layout
decoded by compressed-tensors' own compressors as knowpress decodes it, GPTQ on each grid,
and the settings a grid refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from knowpress.core.progress import Progress
from knowpress.formats.ct_layout import scheme_of, tensors
from knowpress.methods.quant.gptq import GPTQ, output_error
from knowpress.methods.quant.gptq_solver import gptq_quantize, hessian
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.tensors.grids import (
    E2M1,
    Grid,
    compact_rows,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    expand_rows,
    quantize,
)
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.models import tiny_llama, tiny_moe

pytest.importorskip("compressed_tensors")


def test_e2m1_rounds_as_compressed_tensors_does_ties_included() -> None:
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([torch.linspace(-7, 7, 2001), mids, -mids, torch.tensor(E2M1)])
    ours = e2m1_decode(e2m1_encode(x))
    assert torch.equal(ours, cast_to_fp4(x.clone()).float())
    assert torch.equal(
        e2m1_decode(torch.arange(16, dtype=torch.uint8)).abs()[:8], torch.tensor(E2M1)
    )


def test_scales_of_each_float_grid() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    nv = quantize(w, Grid("nvfp4", 4), 16)
    assert nv.global_scale is not None
    assert torch.allclose(nv.global_scale, 448 * 6 / w.abs().amax())
    assert nv.scales.dtype == torch.float8_e4m3fn and nv.scales.float().max() == 448
    mx = quantize(w, Grid("mxfp4", 4), 32)  # the smallest power of two keeping |w| on the grid
    amax = w.reshape(64, 4, 32).abs().amax(-1)
    step = torch.exp2(mx.scales.float() - 127)
    assert mx.scales.dtype == torch.uint8
    assert torch.all(amax / step <= 6) and torch.all(amax / (step / 2) > 6)
    fp8 = quantize(w, Grid("fp8", 8), 32)  # square 32x32 blocks: one scale per block
    assert torch.equal(fp8.scales, fp8.scales[::32].repeat_interleave(32, 0))
    block = w[:32, :32].abs().amax() / 448
    assert torch.allclose(fp8.scales[0, 0], block)


@pytest.mark.parametrize(
    ("grid", "group", "compressor"),
    [("int", 32, "pack-quantized"), ("fp8", 128, "float-quantized"), ("fp8", 32, "float-quantized"),
     ("nvfp4", 16, "nvfp4-pack-quantized"), ("mxfp4", 32, "mxfp4-pack-quantized")],
)  # fmt: skip
def test_compressed_tensors_decodes_the_stored_tensors_as_knowpress(
    grid: str, group: int, compressor: str
) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    for symmetric in (True, False) if grid == "int" else (True,):
        q = quantize(w, Grid(grid, 4 if grid != "fp8" else 8, symmetric), group)
        ours = dequantize(q.codes, q.scales, q.zeros, Grid(grid, 4, symmetric, None,
                                                            q.global_scale), group)  # fmt: skip
        scheme = scheme_of(grid, 4 if grid != "fp8" else 8, group, symmetric, 128)
        stored = {k.split(".", 1)[1]: v for k, v in tensors("m", q, scheme).items()}
        ct = QuantizationScheme(targets=["Linear"], weights=scheme.args(), format=compressor)
        if grid == "fp8":  # float-quantized keeps the e4m3 weight: decode as compressed-tensors
            from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_deq

            theirs = ct_deq(stored["weight"].float(), stored["weight_scale"], args=ct.weights)
        else:
            decoded = BaseCompressor.get_value_from_registry(compressor).decompress(stored, ct)
            theirs = decoded["weight"]
        if grid == "nvfp4":  # its unpacker returns bfloat16: the same values, rounded so
            ours = ours.to(torch.bfloat16)
        if grid == "int":  # it multiplies in the scales' float16 (a model load: the model's)
            ours = ours.to(torch.float16)
        assert torch.equal(theirs.to(ours.dtype), ours), (grid, symmetric)


def test_zero_points_are_packed_as_compressed_tensors_packs_them() -> None:
    """Asymmetric int: compressed-tensors' own compressor, given knowpress's scales and zero
    points, writes the same int32 words for codes and zero points."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    for bits in (4, 8, 3):
        q = quantize(w, Grid("int", bits, False), 32)
        weight = dequantize(q.codes, q.scales, q.zeros, Grid("int", bits, False), 32)
        scheme = scheme_of("int", bits, 32, False, 128)
        ours = {k.split(".", 1)[1]: v for k, v in tensors("m", q, scheme).items()}
        zero = (q.zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # type: ignore[union-attr]
        state = {"weight": weight, "weight_scale": q.scales.float(), "weight_zero_point": zero}
        ct = QuantizationScheme(targets=["Linear"], weights=scheme.args(), format="pack-quantized")
        theirs = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, ct)
        assert ours["weight_zero_point"].shape == (-(-64 * bits // 32), 4)
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(ours[key], theirs[key]), (bits, key)


@pytest.mark.parametrize("block", [{"dtype": "fp8"}, {"dtype": "fp8", "group_size": 32},
                                   {"dtype": "nvfp4"}, {"dtype": "mxfp4"}])  # fmt: skip
def test_gptq_on_a_float_grid_moves_outputs_less_than_rtn(block: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(128, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ mix * 0.3  # correlated inputs: what GPTQ uses
    w = torch.randn(64, 128, generator=g)
    h = hessian(x)
    method = GPTQ.model_validate({"name": "gptq", **block})
    grid = Grid(method.dtype, method.bits)
    q = gptq_quantize(w, h, method.bits, method.group(128), True, True, 0.01, 128, method.dtype)
    stored = compact_rows(q.scales, method.dtype, method.group(128), 128)
    rows = expand_rows(stored, 64, method.dtype, method.group(128), 128)
    assert torch.equal(rows.float(), q.scales.float())  # per row, equal within a block
    g = method.group(128)
    gptq = dequantize(q.codes, q.scales, None, Grid(grid.name, grid.bits, True, None,
                                                     q.global_scale), g)  # fmt: skip
    rtn = method.quantize_weight(w)
    plain = dequantize(rtn.codes, rtn.scales, None, Grid(grid.name, grid.bits, True, None,
                                                          rtn.global_scale), g)  # fmt: skip
    assert output_error(w, gptq, h)["rel_mse"] < 0.8 * output_error(w, plain, h)["rel_mse"]


def test_a_grid_fixes_its_bits_group_and_symmetry() -> None:
    method = RTN.model_validate({"name": "rtn", "dtype": "nvfp4"})
    assert (method.bits, method.group_size, method.symmetric) == (4, 16, True)
    assert RTN.model_validate({"name": "rtn", "dtype": "fp8"}).group_size is None
    for bad, line in (
        ({"dtype": "nvfp4", "bits": 8}, "stores 4-bit codes"),
        ({"dtype": "mxfp4", "group_size": 16}, "groups of 32"),
        ({"dtype": "fp8", "symmetric": False}, "no zero points"),
        ({"dtype": "fp8", "expert_bits": [8, 8]}, "needs dtype int"),
    ):
        with pytest.raises(ValidationError, match=line):
            RTN.model_validate({"name": "rtn", **bad})


def test_targets_a_float_grid_refuses() -> None:
    model = tiny_llama()
    embed = select(model, ["model.embed_tokens"], [])[0]
    assert "int grid only" in (RTN(name="rtn", dtype="mxfp4").check_target(embed) or "")
    moe = tiny_moe("mixtral")
    fused = next(t for t in select(moe, None, ["lm_head"]) if t.kind == "fused_experts")
    block = RTN.model_validate({"name": "rtn", "dtype": "fp8", "group_size": 16})
    assert "fp8 blocks on fused experts" in (block.check_target(fused) or "")
    assert RTN(name="rtn", dtype="fp8").check_target(fused) is None
    plan = RTN(name="rtn", dtype="nvfp4").model_copy(update={"group_size": 32})  # a plan rule
    assert "groups of 16" in (plan.check_target(fused) or "")


@pytest.mark.parametrize("dtype", ["fp8", "nvfp4", "mxfp4"])
def test_fused_experts_on_a_float_grid(dtype: str, calibrated: Callable[[Any], Any]) -> None:
    """Each expert rounded on its own (nvfp4: its own global scale), RTN and GPTQ."""
    from knowpress.tensors.qexperts import packed_names

    for method in (RTN(name="rtn", dtype=dtype), GPTQ(name="gptq", dtype=dtype)):
        model = tiny_moe("mixtral", vocab_size=128)  # the calibration text's vocabulary
        experts = model.model.layers[0].mlp.experts
        before = experts.down_proj.detach().clone()
        targets = select(model, None, ["lm_head"])
        method.apply(model, targets, calibrated(model), Progress(False))
        assert packed_names(experts)["down_proj"].get("grid") == dtype
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
        for e in range(before.shape[0]):
            expected = method.quantize_weight(before[e])
            if method.name == "rtn":  # RTN: exactly each expert's own rounding
                grid = Grid(dtype, method.bits, True, None, expected.global_scale)
                assert torch.equal(experts.down_proj[e],
                                   dequantize(expected.codes, expected.scales, None, grid,
                                              method.group(before.shape[2])))  # fmt: skip
        if dtype == "nvfp4":
            assert experts.down_proj_global_scale.shape == (before.shape[0],)


def test_onnx_int4_export_refuses_codes_that_are_not_integers() -> None:
    from knowpress.core.errors import KnowpressError
    from knowpress.formats.onnx.nbits import prepare

    model = tiny_llama()
    RTN(name="rtn", dtype="nvfp4").apply(model, select(model, None, ["lm_head"]), None,
                                         Progress(False))  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(KnowpressError, match=r"nvfp4 codes are not integers.*weights: float32"):
        prepare(model, 4, 32, True, ())


@pytest.mark.parametrize(
    ("block", "bits"),
    [({"bits": 4, "group_size": 32}, 4 + 16 / 32), ({"dtype": "nvfp4"}, 4 + 8 / 16),
     ({"dtype": "mxfp4"}, 4 + 8 / 32), ({"dtype": "fp8"}, 8 + 32 / 256),
     ({"dtype": "fp8", "group_size": 128}, 8 + 32 / 128**2)],
)  # fmt: skip
def test_bits_per_weight_of_each_grid(block: dict[str, Any], bits: float) -> None:
    """Codes, scales (and nvfp4's 32-bit global scale) per weight of a 256 x 256 linear."""
    method = RTN.model_validate({"name": "rtn", **block})
    entries = QuantLinear.entries("m", 256, 256, method.bits, method.group(256), True,
                                  method.dtype)  # fmt: skip
    itemsize = {"U8": 1, "F16": 2, "F32": 4, "F8_E4M3": 1}
    stored = sum(itemsize[tag] * torch.Size(shape).numel() for _, tag, shape in entries)
    extra = 32 / 256**2 if method.dtype == "nvfp4" else 0
    assert 8 * stored / 256**2 == pytest.approx(bits + extra)
