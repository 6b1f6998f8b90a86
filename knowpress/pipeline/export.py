"""``export_model``: model -> ONNX graph (+ low-bit weights) -> parity -> bundle, into a folder.

Shared by ``kind: export`` (``pipeline/stages/export.py``) and ``compress export``
(``cli/export.py``).
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

from knowpress.core.errors import KnowpressError
from knowpress.core.io import atomic_write_text
from knowpress.formats.onnx import nbits, nbits_graph
from knowpress.formats.onnx.format import EXPORT_FILE
from knowpress.formats.onnx.graph import (
    DATA_FILE,
    GRAPH_FILE,
    as_float32,
    check_exportable,
    export_graph,
    round_half,
    store_half,
)

#: parity.max_rel_logits defaults: float32 matmuls; int4 with int8 activation blocks
#: (accuracy_level 4); int8 dynamic (one activation scale per tensor: coarser)
DEFAULT_MAX_REL = {"exact": 1e-4, "int4_acc4": 0.05, "int8": 0.15}


def refuse_unholdable(model: torch.nn.Module) -> None:
    """Packed modules other than ``QuantLinear`` (fused experts, embeddings, tied heads):
    MatMulNBits is 2-D, so they cannot be carried, and silently widening them is not done."""
    from knowpress.formats.weights import packed_modules
    from knowpress.tensors.qlinear import QuantLinear

    # every packed module (``packing_spec``): packed fused experts expose no
    # ``dequantized_weight``, and their unpacking (a bit shift) has no ONNX translation
    names = [n for n, m in packed_modules(model).items() if not isinstance(m, QuantLinear)]
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
    dequantized = len(info.get("dequantized", ()))
    if config.weights == "int8":
        then = f"; {dequantized} packed linears dequantized first" if dequantized else ""
        return f"int8 dynamic (MatMulInteger{then})"
    if config.weights != "int4":
        return f"float32 ({dequantized} packed linears dequantized)" if dequantized else "float32"
    kept = f", {len(info['kept_float'])} kept float32" if info.get("kept_float") else ""
    reblocked = f", {len(info['reblocked'])} re-blocked" if info.get("reblocked") else ""
    kind = "symmetric" if config.symmetric else "asymmetric"
    level = f"accuracy_level {info['accuracy_level']}"
    if config.accuracy_level == "auto":
        level += " (auto" + (": 4 failed parity)" if info["accuracy_level"] != 4 else ")")
    return (
        f"int4 MatMulNBits (block {config.block_size}, {kind}, {level}; {info['carried']} "
        f"carried{reblocked}, {info['requantized']} re-quantized{kept})"
    )


def _first_level(config: Any) -> int:
    return 4 if config.accuracy_level == "auto" else config.accuracy_level


def _log_layout(info: dict[str, Any], progress: Any) -> None:
    """One line per path a packed linear took other than a plain carry."""
    reblocked, kept = info["reblocked"], info["kept_float"]
    if reblocked:
        first = next(iter(reblocked.items()))
        progress.log(
            f"[dim]export: {len(reblocked)} packed linears re-blocked (their group is no "
            f"MatMulNBits block; codes carried unchanged, scales repeated per block, a partial "
            f"last block padded, or one MatMulNBits per group): {first[0]} {first[1]}"
            f"{', ...' if len(reblocked) > 1 else ''}[/dim]"
        )
    if kept:
        first = next(iter(kept.items()))
        progress.log(
            f"[yellow]export: {len(kept)} packed linears kept float32 as their dequantized "
            f"weights (more bytes than their codes): {first[0]} ({first[1]})"
            f"{', ...' if len(kept) > 1 else ''}[/yellow]"
        )


def _graph(model: Any, graph: Path, config: Any, progress: Any,
           graph_io: frozenset[str]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Export ``model`` to ``graph`` with the configured weights and the KV-policy I/O
    ``io``; (GraphSpec, weights info)."""
    targets: dict[str, Any] = {}
    dequantized: list[str] = []
    if config.weights == "int4":
        targets, layout = nbits.prepare(
            model, 4, config.block_size, config.symmetric, tuple(config.ignore)
        )
    else:  # packed codes as the float weights they decode to
        dequantized = nbits.dequantize_packed(model)
        if dequantized:
            progress.log(
                f"[yellow]export: weights {config.weights}: {len(dequantized)} packed linears "
                f"dequantized to float32 ({dequantized[0]}, ...): the graph holds their "
                "dequantized weights, not their codes[/yellow]"
            )
    if config.store == "float16":
        round_half(model, {f"{t.name}.weight" for t in targets.values()})
    progress.log(f"[dim]export: torch.onnx (dynamo) of {model.config.model_type}[/dim]")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
        spec = export_graph(model, graph, graph_io)
    if config.weights == "int4":
        info = nbits_graph.rewrite(graph, targets, layout, _first_level(config))
        _log_layout(info, progress)
        return spec, info
    extra = {"dequantized": dequantized} if dequantized else {}
    if config.weights == "int8":
        from knowpress.formats.onnx.int8 import quantize_int8

        return spec, quantize_int8(graph) | extra
    return spec, extra


def _limit(config: Any, level: int | None) -> float:
    path = "int8" if config.weights == "int8" else "exact"
    if config.weights == "int4" and level == 4:
        path = "int4_acc4"
    return config.parity.max_rel_logits or DEFAULT_MAX_REL[path]


def _measure(model: Any, graph: Path, spec: Any, config: Any, progress: Any,
             level: int | None) -> tuple[dict[str, Any], float, str | None]:  # fmt: skip
    """Parity of the graph as it is now: (result, its limit, the gate's complaint or None)."""
    from knowpress.pipeline import export_parity as parity
    from knowpress.runtimes.ort_session import OnnxDecoder

    decoder = OnnxDecoder(graph, spec.dump())
    result = parity.measure(model, decoder, config.parity.prompts, config.parity.new_tokens)
    at = "" if level is None else f" at accuracy_level {level}"
    progress.log(
        f"[dim]export parity{at}: max|Δlogits| {result['max_abs_logits']:.3g} (rel "
        f"{result['max_rel_logits']:.3g}), greedy equal {result['greedy_equal']}[/dim]"
    )
    limit = _limit(config, level)
    return result, limit, parity.failure(result, limit, config.parity.greedy_equal)


def _parity(model: Any, graph: Path, spec: Any, config: Any, progress: Any,
            info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Measure and gate parity (``parity.py``); the result with the limit it was held to.
    int4 at ``accuracy_level: auto``: level 4 first, and when its parity fails the graph's
    MatMulNBits are set to level 0 (float math) and measured again; ``info`` records the
    level used (and level 4's figures when it failed)."""
    level = info.get("accuracy_level")
    result, limit, failure = _measure(model, graph, spec, config, progress, level)
    if failure and config.weights == "int4" and config.accuracy_level == "auto" and level == 4:
        progress.log(
            f"[yellow]export: parity fails at accuracy_level 4 ({failure}); MatMulNBits "
            "set to accuracy_level 0 (float math: exact, slower on CPU)[/yellow]"
        )
        nbits_graph.set_accuracy_level(graph, 0)
        info["accuracy_level"] = 0
        info["accuracy_level_4_parity"] = {
            k: result[k] for k in ("max_abs_logits", "max_rel_logits", "greedy_equal")
        }
        result, limit, failure = _measure(model, graph, spec, config, progress, 0)
    if failure:
        fix = ""
        if config.weights == "int4" and level not in (0, None) and config.accuracy_level != "auto":
            fix = (
                f"; MatMulNBits at accuracy_level {level} rounds activations: export with "
                "accuracy_level: 0 (compress export: --accuracy-level 0), or auto to fall back "
                "to 0 when level 4 fails"
            )
        raise KnowpressError(f"parity: {failure}{fix}")
    return result | {"max_rel_limit": limit}


def export_model(
    model: Any, tokenizer: Any, folder: Path, config: Any, policy: Any, progress: Any
) -> dict[str, Any]:
    """Write the bundle into ``folder`` (being written atomically by the caller); returns
    the metrics (parity, weights, files). ``config``: a ``stages.export.ExportConfig``."""
    from knowpress.formats.onnx.bundle import write_bundle
    from knowpress.methods.kv.base import CacheShape

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
    result = _parity(model, graph, spec, config, progress, info)
    label = weights_label(config, info)
    write_bundle(Path(folder), model, tokenizer, spec, label, policy)
    files = {"graph": GRAPH_FILE, "data": DATA_FILE}
    if config.tensorrt is not None:
        from knowpress.formats.onnx.tensorrt import build_engine

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
