"""Low-bit weights in the graph: int4 MatMulNBits (re-quantized or carried from the quantize
stage's codes), int8 dynamic; smaller files, the same numbers as the PyTorch weights."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from export_helpers import REAL, graph_logits, torch_logits
from onnx import numpy_helper
from pydantic import ValidationError

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.export import export_folder
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _export(path: Path, model: Any = None, **options: Any) -> tuple[Any, dict[str, Any]]:
    model = model if model is not None else tiny_llama()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = export_folder(model, tiny_tokenizer(), path, **options)
    return model, metrics


def _ops(path: Path) -> set[str]:
    return {
        n.op_type for n in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node
    }


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("model.onnx*"))


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b)[REAL].max())


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nbits")
    out = {}
    for name, options in {
        "float32": {"weights": "float32"},
        "int4": {"weights": "int4", "accuracy_level": 0, "ignore": []},
        "int4_asym": {"weights": "int4", "accuracy_level": 0, "symmetric": False},
        "int4_acc4": {"weights": "int4", "accuracy_level": 4},
        "int8": {"weights": "int8", "parity": {"greedy_equal": False}},
    }.items():
        _export(root / name, **options)
        out[name] = root / name
    return out


def test_int4_graph_holds_matmulnbits_and_is_smaller(graphs: dict[str, Path]) -> None:
    assert "MatMulNBits" not in _ops(graphs["float32"])
    for name in ("int4", "int4_asym", "int4_acc4"):
        assert "MatMulNBits" in _ops(graphs[name]), name
        assert _bytes(graphs[name]) < 0.6 * _bytes(graphs["float32"]), name
    assert "MatMulInteger" in _ops(graphs["int8"])
    assert _bytes(graphs["int8"]) < 0.6 * _bytes(graphs["float32"])


def test_int4_graph_computes_its_dequantized_weights(graphs: dict[str, Path]) -> None:
    """At accuracy_level 0 MatMulNBits dequantizes to float32: the graph equals a float
    model holding the dequantized weights (bit order, zero points and scales as stored)."""
    from knowpress.formats.onnx import nbits

    for name, symmetric, ignore in (("int4", True, ()), ("int4_asym", False, ("lm_head",))):
        model = tiny_llama()
        nbits.prepare(model, 4, 32, symmetric, ignore)
        assert _close(graph_logits(graphs[name]), torch_logits(model)) < 1e-4, name
    # the float graph of the original weights differs: the int4 graph is quantized
    assert _close(graph_logits(graphs["int4"]), graph_logits(graphs["float32"])) > 1e-3


def test_activation_rounding_paths_stay_near(graphs: dict[str, Path]) -> None:
    reference = graph_logits(graphs["float32"])
    scale = float(np.abs(reference).max())
    assert _close(graph_logits(graphs["int8"]), reference) < 0.1 * scale
    assert _close(graph_logits(graphs["int4_acc4"]), graph_logits(graphs["int4"])) < 0.1 * scale


def _packed(group: int = 32, bits: int = 4, symmetric: bool = True) -> Any:
    model = tiny_llama()
    targets = select(model, None, ["lm_head"])
    method = RTN(name="rtn", bits=bits, group_size=group, symmetric=symmetric)
    method.apply(model, targets, None, Progress(False))  # type: ignore[arg-type]
    return model


def test_quantize_stage_codes_are_carried_byte_for_byte(tmp_path: Path) -> None:
    model = _packed(symmetric=False)
    expected = torch_logits(model)
    packed = {
        n: m.weight_packed.numpy().copy()
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    _, metrics = _export(tmp_path, model, weights="int4", accuracy_level=0, symmetric=True)
    assert metrics["carried"] == len(packed) and metrics["requantized"] == 0
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for name, codes in packed.items():
        assert np.array_equal(stored[f"{name}.qweight"].reshape(codes.shape), codes), name
    assert _close(graph_logits(tmp_path), expected) < 1e-4
    # re-quantizing the carried weights would not give back the same codes
    assert 0 < metrics["requantize_changed_codes"] < 0.5


def test_codes_matmulnbits_cannot_run_are_refused(tmp_path: Path) -> None:
    """3-bit codes: MatMulNBits runs 4 and 8 bits (float32 exports their dequantized
    weights); group sizes it cannot take as a block: tests/export/test_nbits_groups.py."""
    with pytest.raises(KnowpressError, match="3-bit codes cannot be carried into MatMulNBits"):
        _export(tmp_path / "a", _packed(bits=3), weights="int4")
    with pytest.raises(ValidationError, match="48 is not a power of two"):
        _export(tmp_path / "c", weights="int4", block_size=48)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_moe_int4_quantizes_its_linears_and_keeps_fused_experts_float(
    arch: str, tmp_path: Path
) -> None:
    from knowpress.testing.models import tiny_moe

    model = tiny_moe(arch, layers=2, vocab_size=128)
    _, metrics = _export(tmp_path, model, weights="int4", accuracy_level=0)
    assert metrics["matmul_nbits"] > 0 and metrics["parity_greedy_equal"]
    assert metrics["parity_max_rel_logits"] < 1e-4
    # DeepSeek's kv_b_proj reads the rank-16 latent: one block of 32, padded
    assert not metrics["kept_float"] and "kept float32" not in metrics["weights"]


def test_store_float16_halves_the_float_tensors_and_keeps_parity(tmp_path: Path) -> None:
    _export(tmp_path / "f32", weights="int4", accuracy_level=0)
    _, half = _export(tmp_path / "f16", weights="int4", accuracy_level=0, store="float16")
    assert half["float16_tensors"] >= 1  # the embedding (lm_head is its Transpose)
    saved = _bytes(tmp_path / "f32") - _bytes(tmp_path / "f16")
    assert saved >= 0.95 * 128 * 64 * 2  # the float32 embedding [128, 64] at half the bytes
    assert half["parity_max_rel_logits"] < 1e-4 and half["parity_greedy_equal"]
    assert "Cast" in _ops(tmp_path / "f16")


def test_packed_fused_experts_are_refused_before_the_graph() -> None:
    """Packed fused MoE experts have no MatMulNBits layout (and their unpacking has no ONNX
    translation): the export refuses them in one line naming them, the packed linears beside
    them being carried as usual."""
    from knowpress.formats.weights import packed_modules
    from knowpress.pipeline.export import refuse_unholdable
    from knowpress.testing.models import tiny_moe

    model = tiny_moe("mixtral", layers=1)
    method = RTN(name="rtn", bits=4, group_size=16)
    method.apply(model, select(model, None, ["lm_head"]), None, Progress(False))
    packed = packed_modules(model)
    experts = [n for n, m in packed.items() if not isinstance(m, QuantLinear)]
    assert experts and any(isinstance(m, QuantLinear) for m in packed.values())
    with pytest.raises(KnowpressError, match=rf"^{experts[0]} .*packed modules MatMulNBits"):
        refuse_unholdable(model)
