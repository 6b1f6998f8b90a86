"""Every layer the quantize stage produced exports: group sizes MatMulNBits cannot take as a
block (per-row groups of widths like 172, groups such as 48, groups under 16), float32 and
int8 exports of packed models (their dequantized weights), and ``accuracy_level: auto``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import REAL, graph_logits, torch_logits
from onnx import TensorProto, helper, numpy_helper

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.onnx import nbits, nbits_graph
from knowpress.pipeline.stages.quantize import QuantizeConfig
from knowpress.tensors.packing import quantize_groups, unpack
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.export import export_folder
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _packed(group: int = 32, symmetric: bool = True, **shape: int) -> Any:
    """A tiny Llama quantized as the quantize stage does it (RTN int4, the plan's group-size
    fallback: ``resolve``)."""
    model = tiny_llama(**shape)
    method = {"name": "rtn", "bits": 4, "group_size": group, "symmetric": symmetric}
    config = QuantizeConfig(kind="quantize", method=method)
    assignments = config.resolve(model)
    plan = {a.target.name: a.method for a in assignments}
    targets = [a.target for a in assignments]
    config.method.apply(model, targets, None, Progress(False), plan)  # type: ignore[arg-type]
    return model


def _export(path: Path, model: Any, **options: Any) -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):
        return export_folder(model, tiny_tokenizer(), path, **options)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b)[REAL].max() / np.abs(b)[REAL].max())


def _graph_nodes(path: Path) -> dict[str, Any]:
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return {n.name: n for n in graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("group", "k", "carried"),
    [(32, 128, True), (172, 172, True), (48, 96, True), (43, 172, True), (32, 172, False),
     (32, 20, False)],
)  # fmt: skip
def test_onnxruntime_computes_every_layout(group: int, k: int, carried: bool,
                                           symmetric: bool) -> None:  # fmt: skip
    """onnxruntime's MatMulNBits takes ``ceil(K / block)`` blocks per row (B ``[N, blocks,
    block·bits/8]``, scales ``[N·blocks]``, zero points ``[N·ceil(blocks·bits/8)]``): the
    graph ``nbits`` builds for a linear computes ``A · Wᵀ`` of its dequantized weight for
    every layout — codes at their group (32), one group per row of 172 in padded blocks,
    groups of 48 re-blocked at 16, groups of 43 sliced, RTN with a partial last block."""
    gen = torch.Generator().manual_seed(0)
    n = 24
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data.copy_(torch.randn(n, k, generator=gen))
    if carried:  # codes in groups of ``group`` as the quantize stage stores them
        q = quantize_groups(linear.weight, 4, group, symmetric)
        module = QuantLinear.from_quantized(linear, q, 4, group, "rtn")
        target, _ = nbits._carry("w", module)
        assert target is not None
        assert torch.equal(nbits.dequantized(target), module.dequantized_weight(torch.float32))
    else:  # float linears: RTN at block ``group``, the last block partial
        target = nbits._quantize("w", linear, 4, group, symmetric)
    for part in target.parts:
        blocks = -(-part.k // part.block)
        assert part.block >= 16 and not part.block & (part.block - 1)
        assert part.packed.shape == (n, blocks, part.block // 2)
        assert part.scales.shape == (n, blocks)
        assert symmetric or part.zeros.shape == (n, -(-blocks // 2))  # type: ignore[union-attr]
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    nodes, inits = nbits_graph._node(onnx, helper, node, target, "w", 0)
    assert [n.op_type for n in nodes].count("MatMulNBits") == (k // 43 if group == 43 else 1)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [5, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, n])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=opsets).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    a = torch.randn(5, k, generator=gen).numpy()
    expected = a @ nbits.dequantized(target).numpy().T
    got = session.run(None, {"A": a})[0]
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    weight = linear.weight.detach()
    assert torch.allclose(nbits.dequantized(target), weight, atol=0.25 * weight.abs().max())


def test_carry_block_holds_every_group_or_says_none() -> None:
    assert nbits.carry_block(32, 128, 4, True) == 32  # a power of two: as it is
    assert nbits.carry_block(128, 128, 4, True) == 128
    assert nbits.carry_block(172, 172, 4, True) == 64  # per row: fewest bytes, padded
    assert nbits.carry_block(48, 96, 4, True) == 16  # each group's scale over 3 blocks
    assert nbits.carry_block(96, 192, 4, False) == 32
    assert nbits.carry_block(8, 64, 4, True) is None  # under 16
    assert nbits.carry_block(30, 60, 4, True) is None  # no power of two >= 16 divides 30
    assert nbits.carry_block(12, 12, 4, True) == 16  # one group per row: one padded block


def _codes(model: Any) -> dict[str, np.ndarray]:
    return {
        name: unpack(m.weight_packed, m.bits, m.in_features).numpy()
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def _carried_codes(path: Path, name: str, parts: int, k: int) -> np.ndarray:
    """The codes the graph's MatMulNBits hold for linear ``name``, padding dropped."""
    graph = onnx.load(str(path / "model.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prefixes = [name] if parts == 1 else [f"{name}.part{i}" for i in range(parts)]
    width = k // parts
    out = []
    for prefix in prefixes:
        packed = stored[f"{prefix}.qweight"]
        flat = torch.from_numpy(packed.reshape(packed.shape[0], -1).copy())
        out.append(unpack(flat, 4, width).numpy())
    return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def per_row(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MLP width 172: group 32 falls back to one group per row for down_proj (the plan's
    fallback); exported int4 at the default accuracy_level, at 0, and float32."""
    root = tmp_path_factory.mktemp("per_row")
    model = _packed(group=32, intermediate_size=172)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.group_size == 172
    out: dict[str, Any] = {"expected": torch_logits(model), "root": root}
    out["codes"] = _codes(model)
    for name, options in {
        "auto": {"weights": "int4"},
        "level0": {"weights": "int4", "accuracy_level": 0},
        "float32": {"weights": "float32"},
    }.items():
        out[name] = _export(root / name, _packed(group=32, intermediate_size=172), **options)
    return out


def test_per_row_codes_export_to_int4_byte_for_byte(per_row: dict[str, Any]) -> None:
    metrics, path = per_row["level0"], per_row["root"] / "level0"
    assert metrics["carried"] == len(per_row["codes"]) == 14
    assert metrics["requantized"] == 0 and not metrics["kept_float"]
    assert metrics["reblocked"] == {
        f"model.layers.{i}.mlp.down_proj": "group 172 -> block 64" for i in (0, 1)
    }
    assert "2 re-blocked" in metrics["weights"]
    for name, codes in per_row["codes"].items():  # the quantize stage's codes, unchanged
        assert np.array_equal(_carried_codes(path, name, 1, codes.shape[1]), codes), name
    node = _graph_nodes(path)["model.layers.0.mlp.down_proj.MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["K"], attrs["block_size"], attrs["accuracy_level"]) == (172, 64, 0)
    # the graph computes the packed model's own weights
    assert _rel(graph_logits(path), per_row["expected"]) < 1e-5
    assert metrics["parity_max_rel_logits"] < 1e-4 and metrics["parity_greedy_equal"]


def test_groups_48_and_43_are_reblocked_and_sliced(tmp_path: Path) -> None:
    """Hidden 96 at group 48: blocks of 16, each group's scale repeated; MLP width 172 at
    group 48 falls back to 43 (4 groups per row): one MatMulNBits per group, summed."""
    model = _packed(group=48, hidden_size=96, intermediate_size=172)
    assert model.model.layers[0].mlp.down_proj.group_size == 43
    codes, expected = _codes(model), torch_logits(model)
    metrics = _export(tmp_path, model, weights="int4", accuracy_level=0)
    assert metrics["carried"] == 14 and not metrics["kept_float"]
    reblocked = metrics["reblocked"]
    assert reblocked["model.layers.1.self_attn.q_proj"] == "group 48 -> block 16"
    down = "model.layers.0.mlp.down_proj"
    assert reblocked[down] == "group 43 -> 4 slices of 43 columns at block 16"
    assert len(reblocked) == 14
    for name, stored in codes.items():
        parts = 4 if name.endswith("down_proj") else 1
        assert np.array_equal(_carried_codes(tmp_path, name, parts, stored.shape[1]), stored)
    assert {f"{down}.part{i}.MatMulNBits" for i in range(4)} <= set(_graph_nodes(tmp_path))
    assert _rel(graph_logits(tmp_path), expected) < 1e-5
    assert metrics["parity_greedy_equal"]


def test_default_accuracy_level_passes_its_own_parity(per_row: dict[str, Any]) -> None:
    metrics = per_row["auto"]
    assert metrics["accuracy_level"] in (0, 4)
    assert metrics["parity_max_rel_logits"] <= metrics["parity_max_rel_limit"]
    assert metrics["parity_greedy_equal"]
    assert f"accuracy_level {metrics['accuracy_level']} (auto" in metrics["weights"]
    assert _rel(graph_logits(per_row["root"] / "auto"), per_row["expected"]) < 0.05


def test_float32_export_of_a_packed_model_is_its_dequantized_weights(
    per_row: dict[str, Any],
) -> None:
    metrics = per_row["float32"]
    assert len(metrics["dequantized"]) == 14
    assert metrics["weights"] == "float32 (14 packed linears dequantized)"
    assert not _graph_nodes(per_row["root"] / "float32")
    assert _rel(graph_logits(per_row["root"] / "float32"), per_row["expected"]) < 1e-5


def test_int8_export_of_a_packed_model_dequantizes_first(tmp_path: Path) -> None:
    metrics = _export(tmp_path, _packed(), weights="int8", parity={"greedy_equal": False})
    assert len(metrics["dequantized"]) == 14
    assert "14 packed linears dequantized first" in metrics["weights"]


def test_codes_no_layout_holds_are_kept_float_as_their_dequantized_weights(
    tmp_path: Path,
) -> None:
    """Group 8 (asked for): 8 groups per row of 64 are sliced; 32 per row of 256 are more
    than MAX_SLICES, so down_proj stays a float MatMul of its dequantized weight."""
    model = _packed(group=8, intermediate_size=256)
    expected = torch_logits(model)
    metrics = _export(tmp_path, model, weights="int4", accuracy_level=0)
    assert set(metrics["kept_float"]) == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert (
        "32 groups per row are more than 16"
        in metrics["kept_float"]["model.layers.0.mlp.down_proj"]
    )
    assert metrics["carried"] == 12 and "2 kept float32" in metrics["weights"]
    assert metrics["reblocked"]["model.layers.0.mlp.up_proj"] == (
        "group 8 -> 8 slices of 8 columns at block 16"
    )
    assert _rel(graph_logits(tmp_path), expected) < 1e-5


def test_auto_falls_back_to_level_0_and_a_fixed_level_names_the_fix(tmp_path: Path) -> None:
    strict = {"max_rel_logits": 1e-3}  # level 4's int8 activation blocks exceed it here
    metrics = _export(tmp_path / "auto", _packed(), weights="int4", parity=strict)
    assert metrics["accuracy_level"] == 0
    assert metrics["accuracy_level_4_parity"]["max_rel_logits"] > 1e-3
    assert metrics["parity_max_rel_logits"] < 1e-5
    assert "accuracy_level 0 (auto: 4 failed parity)" in metrics["weights"]
    levels = {
        helper.get_attribute_value(a)
        for node in _graph_nodes(tmp_path / "auto").values()
        for a in node.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {0}
    with pytest.raises(KnowpressError, match=r"export with accuracy_level: 0 \(compress export"):
        _export(tmp_path / "fixed", _packed(), weights="int4", accuracy_level=4, parity=strict)


def test_cli_accuracy_level_takes_auto_and_numbers() -> None:
    from knowpress.cli.app import build_parser
    from knowpress.cli.export import _config

    def level(*argv: str) -> Any:
        args = build_parser().parse_args(["export", "m", "-o", "x", *argv])
        return _config(args).accuracy_level

    assert level() == "auto"
    assert level("--accuracy-level", "0") == 0
    assert level("--accuracy-level", "auto") == "auto"
