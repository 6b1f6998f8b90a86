"""``export_model``: model -> ONNX graph (+ low-bit weights) -> parity -> bundle, into a folder.

Shared by ``kind: export`` (``stages/export.py``) and ``compress export`` (``cli_export.py``).
Steps: with ``weights: int4``, ``nbits.prepare`` swaps every target for the float linear
its codes dequantize to (carried from ``QuantLinear``s, RTN otherwise), so the graph and
the PyTorch reference share weights; the float graph is exported (``onnx.py``); int4
rewrites its MatMuls to ``MatMulNBits``, int8 runs dynamic quantization; parity is measured
and gated (``parity.py``); the bundle files, ``knowpress_export.json`` and, if asked, a
TensorRT engine are written.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from knowpress.errors import KnowpressError
from knowpress.export import nbits
from knowpress.export.onnx import (
    DATA_FILE,
    GRAPH_FILE,
    as_float32,
    check_exportable,
    export_graph,
    round_half,
    store_half,
)
from knowpress.models.io import atomic_write_text

EXPORT_FILE = "knowpress_export.json"
#: parity.max_rel_logits defaults: float32 matmuls; int4 with int8 activation blocks
#: (accuracy_level 4); int8 dynamic (one activation scale per tensor: coarser)
DEFAULT_MAX_REL = {"exact": 1e-4, "int4_acc4": 0.05, "int8": 0.15}


def refuse_unholdable(model: torch.nn.Module) -> None:
    """Packed modules other than ``QuantLinear`` (fused experts, embeddings, tied heads):
    MatMulNBits is 2-D, so they cannot be carried, and silently widening them is not done."""
    from knowpress.compress.quant.qlinear import QuantLinear

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) or not hasattr(module, "dequantized_weight"):
            continue
        names.append(name)
    if names:
        raise KnowpressError(
            f"{names[0]} (and {len(names) - 1} more) are packed modules MatMulNBits cannot hold "
            "(fused experts, embeddings, tied heads); quantize them with ignore, or export "
            "their float model"
        )


def undispatch(model: torch.nn.Module) -> None:
    """A model loaded from a compressed-tensors folder keeps compressed-tensors' first-call
    decompress hook, which wraps every module in an offload ``forward`` (it reads
    ``data_ptr``, which torch.export cannot trace): the hook is dropped (knowpress already
    rebuilt the packed layers) and any wrapper removed, tensors onloaded."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if "decompress_hook" in getattr(hook, "__qualname__", ""):
            del model._forward_pre_hooks[key]
    if not any(hasattr(m, "_original_forward_func") for m in model.modules()):
        return
    from compressed_tensors.offload.dispatch import remove_dispatch

    remove_dispatch(model, onload_tensors=True)


def weights_label(config: Any, info: dict[str, Any]) -> str:
    if config.weights == "int8":
        return "int8 dynamic (MatMulInteger)"
    if config.weights != "int4":
        return "float32"
    kept = f", {len(info['kept_float'])} kept float32" if info.get("kept_float") else ""
    kind = "symmetric" if config.symmetric else "asymmetric"
    return (
        f"int4 MatMulNBits (block {config.block_size}, {kind}, accuracy_level "
        f"{config.accuracy_level}; {info['carried']} carried, {info['requantized']} "
        f"re-quantized{kept})"
    )


def _graph(model: Any, graph: Path, config: Any, progress: Any,
           graph_io: frozenset[str]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Export ``model`` to ``graph`` with the configured weights and the KV-policy I/O
    ``io``; (GraphSpec, weights info)."""
    targets: dict[str, Any] = {}
    if config.weights == "int4":
        targets, kept = nbits.prepare(
            model, 4, config.block_size, config.symmetric, tuple(config.ignore)
        )
    elif any(hasattr(m, "weight_packed") for m in model.modules()):
        raise KnowpressError(
            f"weights {config.weights}: the model holds packed codes; "
            "export weights: int4 to carry them into MatMulNBits"
        )
    if config.store == "float16":
        round_half(model, {f"{t.name}.weight" for t in targets.values()})
    progress.log(f"[dim]export: torch.onnx (dynamo) of {model.config.model_type}[/dim]")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
        spec = export_graph(model, graph, graph_io)
    if config.weights == "int4":
        info = nbits.rewrite(graph, targets, config.accuracy_level)
        if kept:
            progress.log(
                f"[yellow]export: {len(kept)} linears kept float32 (in_features "
                f"not a multiple of block {config.block_size}): {kept[0]}, ...[/yellow]"
            )
        return spec, info | {"kept_float": kept}
    if config.weights == "int8":
        from knowpress.export.int8 import quantize_int8

        return spec, quantize_int8(graph)
    return spec, {}


def _parity(model: Any, graph: Path, spec: Any, config: Any, progress: Any) -> dict[str, Any]:
    """Measure and gate parity (``parity.py``); the result with the limit it was held to."""
    from knowpress.export import parity
    from knowpress.export.session import OnnxDecoder

    decoder = OnnxDecoder(graph, spec.dump())
    result = parity.measure(model, decoder, config.parity.prompts, config.parity.new_tokens)
    path = "int8" if config.weights == "int8" else "exact"
    if config.weights == "int4" and config.accuracy_level == 4:
        path = "int4_acc4"
    limit = config.parity.max_rel_logits or DEFAULT_MAX_REL[path]
    progress.log(
        f"[dim]export parity: max|Δlogits| {result['max_abs_logits']:.3g} (rel "
        f"{result['max_rel_logits']:.3g}), greedy equal {result['greedy_equal']}[/dim]"
    )
    parity.gate(result, limit, config.parity.greedy_equal)
    return result | {"max_rel_limit": limit}


def export_model(
    model: Any, tokenizer: Any, folder: Path, config: Any, policy: Any, progress: Any
) -> dict[str, Any]:
    """Write the bundle into ``folder`` (being written atomically by the caller); returns
    the metrics (parity, weights, files). ``config``: a ``stages.export.ExportConfig``."""
    from knowpress.compress.kv.base import CacheShape
    from knowpress.export.bundle import write_bundle

    check_exportable(model.config.get_text_config(decoder=True))
    graph_io: frozenset[str] = frozenset()
    if policy is not None:
        policy.check(CacheShape.of(model), "onnxruntime")
        graph_io = policy.graph_io()
    undispatch(model)
    refuse_unholdable(model)
    as_float32(model)
    graph = Path(folder) / GRAPH_FILE
    spec, info = _graph(model, graph, config, progress, graph_io)
    if config.store == "float16":
        info["float16_tensors"] = store_half(graph)
    result = _parity(model, graph, spec, config, progress)
    label = weights_label(config, info)
    write_bundle(Path(folder), model, tokenizer, spec, label, policy)
    files = {"graph": GRAPH_FILE, "data": DATA_FILE}
    if config.tensorrt is not None:
        from knowpress.export.tensorrt import build_engine

        files["engine"] = build_engine(graph, Path(folder), config.tensorrt, spec.dump())
    record = {
        "graph": spec.dump(),
        "files": files,
        "weights": label,
        "weights_info": info,
        "parity": result,
    }
    atomic_write_text(Path(folder) / EXPORT_FILE, json.dumps(record, indent=1))
    sizes = {name: (Path(folder) / f).stat().st_size for name, f in files.items()}
    return {
        "weights": label,
        **{f"parity_{k}": v for k, v in result.items()},
        **info,
        "file_bytes": sizes,
    }
