"""A TensorRT engine from the exported float graph (``tensorrt`` Python API, TensorRT 10).

``builder.create_network(0)`` (explicit batch is the only mode in TensorRT 10), the
``OnnxParser`` reads ``model.onnx`` with its external data (``parse_from_file``), one
optimization profile gives every dynamic axis ``min / opt / max``::

    batch 1 / opt_batch / max_batch, sequence 1 / opt_sequence / max_positions,
    past_sequence 0 / opt_sequence / max_positions - 1,
    total_sequence 1 / 2·opt_sequence / max_positions

and ``BuilderFlag.FP16`` or ``BF16`` sets the precision; ``build_serialized_network``
writes ``model.engine``. ``MatMulNBits`` and ``MatMulInteger`` graphs are onnxruntime's,
not TensorRT's: an engine is built from a ``weights: float32`` export only. Needs a CUDA GPU
and the ``tensorrt`` package (NVIDIA's index); elsewhere one line says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError

ENGINE_FILE = "model.engine"


def available() -> str | None:
    """None when an engine can be built here, else why not (one line)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return (
            "tensorrt is not installed (pip install tensorrt pulls the wheel from "
            "NVIDIA's index) and needs a CUDA GPU; export without tensorrt here"
        )
    import torch

    if not torch.cuda.is_available():
        return "tensorrt needs a CUDA GPU and none is visible; export without tensorrt here"
    return None


def check(weights: str) -> None:
    reason = available()
    if reason is not None:
        raise KnowpressError(f"tensorrt: {reason}")
    if weights != "float32":
        raise KnowpressError(
            f"tensorrt: weights {weights} puts onnxruntime contrib ops in the graph; "
            "build the engine from weights: float32 (precision fp16/bf16 is TensorRT's)"
        )


def _shape(dims: Any, sizes: dict[str, tuple[int, int, int]]) -> list[list[int]]:
    out: list[list[int]] = [[], [], []]
    for dim in dims:
        key = dim if isinstance(dim, str) else None
        for slot in range(3):
            out[slot].append(int(dim) if key is None else sizes[key][slot])
    return out


def build_engine(graph: Path, folder: Path, options: Any, spec: Any) -> str:
    """Build and write ``ENGINE_FILE``; ``options``: precision, opt_batch, max_batch,
    opt_sequence (``stages.export.TensorRTSpec``)."""
    import tensorrt as trt

    from knowpress.formats.onnx.graph import graph_inputs

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise KnowpressError(f"tensorrt: the ONNX parser refused the graph ({errors[0][:200]})")
    top, opt = int(spec["max_positions"]), options.opt_sequence
    sizes = {
        "batch": (1, options.opt_batch, options.max_batch),
        "sequence": (1, opt, top),
        "past_sequence": (0, opt, top - 1),
        "total_sequence": (1, 2 * opt, top),
    }
    profile = builder.create_optimization_profile()
    for name, dims in graph_inputs(graph):
        low, mid, high = _shape(dims, sizes)
        profile.set_shape(name, low, mid, high)
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16 if options.precision == "fp16" else trt.BuilderFlag.BF16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise KnowpressError("tensorrt: the builder returned no engine (see its log above)")
    (folder / ENGINE_FILE).write_bytes(bytes(engine))
    return ENGINE_FILE
