"""int8 dynamic quantization of the exported graph (onnxruntime.quantization.quantize_dynamic).

Weights of every ``MatMul`` on a constant become int8 per output channel (symmetric,
``s = max|W_col| / 127``); activations are quantized per tensor at run time
(``DynamicQuantizeLinear``: ``s = (max - min) / 255`` over the tensor, uint8 with a zero
point) and multiplied in integers (``MatMulInteger``), then rescaled. The graph replaces the
float one in place; its external data is rewritten.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError


def quantize_int8(path: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from knowpress.formats.onnx.nbits_graph import save

    scratch = path.parent / ".int8"
    scratch.mkdir()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # it logs pre-processing advice at WARNING
    try:
        quantize_dynamic(
            model_input=str(path),
            model_output=str(scratch / path.name),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
        )
        model = onnx.load(str(scratch / path.name))
    finally:
        root.setLevel(level)
        shutil.rmtree(scratch, ignore_errors=True)
    count = sum(node.op_type == "MatMulInteger" for node in model.graph.node)
    if count == 0:
        raise KnowpressError("int8: no MatMul on a constant was quantized; export weights: float32")
    save(model, path)
    return {"matmul_integer": count}
