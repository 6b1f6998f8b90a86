"""The graph side of ``nbits.py``: after export, ``rewrite`` swaps each ``MatMul`` whose
constant operand is a prepared weight (found by content hash) for onnxruntime's
``com.microsoft.MatMulNBits`` — or its slices, summed —; ``set_accuracy_level`` sets the
kernels' activation precision on a saved graph; ``save`` writes a model with its weights in
one external-data file. The layouts and the torch side are in ``nbits.py``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from knowpress.core.errors import KnowpressError
from knowpress.formats.onnx.nbits import Layout, Part, Target


def _part_node(
    onnx: Any, helper: Any, a: str, out: str, part: Part, bits: int, prefix: str,
    accuracy_level: int,
) -> tuple[Any, list[Any]]:  # fmt: skip
    n = part.scales.shape[0]
    b = onnx.numpy_helper.from_array(part.packed, f"{prefix}.qweight")
    s = onnx.numpy_helper.from_array(part.scales.reshape(-1), f"{prefix}.scales")
    inits, inputs = [b, s], [a, b.name, s.name]
    if part.zeros is not None:
        z = onnx.numpy_helper.from_array(part.zeros.reshape(-1), f"{prefix}.qzeros")
        inits.append(z)
        inputs.append(z.name)
    new = helper.make_node(
        "MatMulNBits",
        inputs,
        [out],
        name=f"{prefix}.MatMulNBits",
        domain="com.microsoft",
        K=part.k,
        N=n,
        bits=bits,
        block_size=part.block,
        accuracy_level=accuracy_level,
    )
    return new, inits


def _node(
    onnx: Any, helper: Any, node: Any, target: Target, prefix: str, accuracy_level: int
) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers replacing the MatMul ``node``: one MatMulNBits, or per
    part a ``Slice`` of ``A``'s last axis, its MatMulNBits, and a ``Sum``."""
    a, out = node.input[0], node.output[0]
    if len(target.parts) == 1:
        new, inits = _part_node(
            onnx, helper, a, out, target.parts[0], target.bits, prefix, accuracy_level
        )
        return [new], inits
    nodes, inits, outputs = [], [], []
    axes = onnx.numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.slice_axes")
    inits.append(axes)
    for i, part in enumerate(target.parts):
        name = f"{prefix}.part{i}"
        bounds = [
            onnx.numpy_helper.from_array(np.array([v], np.int64), f"{name}.{what}")
            for what, v in (("start", part.start), ("end", part.start + part.k))
        ]
        inits.extend(bounds)
        sliced = f"{name}.input"
        nodes.append(helper.make_node(
            "Slice", [a, bounds[0].name, bounds[1].name, axes.name], [sliced], name=f"{name}.Slice"
        ))  # fmt: skip
        new, extra = _part_node(
            onnx, helper, sliced, f"{name}.output", part, target.bits, name, accuracy_level
        )
        nodes.append(new)
        inits.extend(extra)
        outputs.append(new.output[0])
    nodes.append(helper.make_node("Sum", outputs, [out], name=f"{prefix}.Sum"))
    return nodes, inits


def rewrite(
    path: Path, targets: dict[str, Target], layout: Layout, accuracy_level: int
) -> dict[str, Any]:
    """Replace the ``MatMul`` of every target in the graph at ``path`` with ``MatMulNBits``
    (in place; external data rewritten); every target must be found. The weights info:
    counts, the layout's re-blocked and kept-float layers, the accuracy level."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    found: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        const = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        digest = None
        if const is not None and len(const.dims) == 2:
            digest = hashlib.sha1(
                onnx.numpy_helper.to_array(const).astype(np.float32).tobytes()
            ).hexdigest()
        if digest not in targets:
            nodes.append(node)
            continue
        target = targets[digest]
        new, extra = _node(onnx, helper, node, target, target.name, accuracy_level)
        nodes.extend(new)
        graph.initializer.extend(extra)
        found[target.name] = node.input[1]
    missing = sorted({t.name for t in targets.values()} - set(found))
    if missing:
        raise KnowpressError(
            f"{len(missing)} quantized linears ({missing[0]}, ...) are not a MatMul on a "
            "constant in the exported graph; export weights: float32"
        )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save(model, path)
    carried = [t for t in targets.values() if t.carried]
    info = {
        "matmul_nbits": len(found),
        "carried": len(carried),
        "requantized": len(found) - len(carried),
        "bits": sorted({t.bits for t in targets.values()}),
        "accuracy_level": accuracy_level,
        "reblocked": dict(layout.reblocked),
        "kept_float": dict(layout.kept_float),
    }
    if carried:  # what re-quantizing instead of carrying would have done to those weights
        info["requantize_changed_codes"] = sum(t.requant_changed or 0 for t in carried) / len(
            carried
        )
        info["requantize_min_sqnr_db"] = min(t.requant_sqnr_db or 0 for t in carried)
    return info


def set_accuracy_level(path: Path, accuracy_level: int) -> int:
    """Set ``accuracy_level`` on every ``MatMulNBits`` of the graph at ``path`` (the graph
    file alone is rewritten; its external data stays); the number of nodes changed."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", accuracy_level)])
        changed += 1
    from knowpress.core.io import atomic_file

    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp))
    return changed


def save(model: Any, path: Path) -> None:
    """Save with every tensor in one external data file beside the graph."""
    import onnx

    from knowpress.core.io import _umask
    from knowpress.formats.onnx.graph import DATA_FILE

    data = path.parent / DATA_FILE
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    mode = 0o666 & ~_umask()  # onnx creates the data file 0600; bundles are shared
    for file in (path, data):
        if file.exists():
            os.chmod(file, mode)
