"""Block-wise low-bit weights in the graph: onnxruntime's ``com.microsoft.MatMulNBits``.

``Y = A · dequant(B)ᵀ``: ``B`` uint8 ``[N, K / block, block · bits / 8]`` (codes packed
low-bits-first along K), ``scales`` float ``[N · K / block]`` (A's dtype), ``zero_points``
uint8 ``[N · ceil(K / block · bits / 8)]`` packed the same way (absent: ``2^(bits-1)``),
``dequant = (code - zero) · scale``. knowpress's ``QuantLinear`` stores exactly this
(``compress/quant/packing.py``: 4-bit low nibble = even column, symmetric codes offset by
``2^(bits-1)``, zero points packed at the code width per row), so codes the quantize stage
chose (GPTQ) are *carried* byte for byte: only scales widen from fp16 to float32. Float
linears are quantized here by round-to-nearest (``quantize_groups``) at ``bits`` /
``block_size`` / ``symmetric``.

``accuracy_level`` is the minimum precision of the matmul's inputs (0 unset, 1 fp32,
2 fp16, 3 bf16, 4 int8): at 4 the CPU kernel quantizes each block of ``A`` to int8 and
uses integer dot products, which is what makes int4 fast on CPU (onnxruntime-genai#406:
int4 at 1.64 tok/s vs fp32 10.67 before it) at the cost of activation rounding.

The flow: ``prepare`` replaces every target (``QuantLinear`` or float ``nn.Linear``) in the
PyTorch model with an ``nn.Linear`` holding the *dequantized* weight, so the float graph and
the parity reference compute what the low-bit graph computes; after export, ``rewrite``
finds each ``MatMul`` whose constant operand is such a weight (transposed, by content hash)
and swaps it for ``MatMulNBits``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from knowpress.errors import KnowpressError

NBITS = (4, 8)  # widths MatMulNBits runs on CPU


@dataclass
class Target:
    name: str
    bits: int
    block: int
    packed: np.ndarray  # uint8 [N, K * bits / 8]
    scales: np.ndarray  # float32 [N, K / block]
    zeros: np.ndarray | None  # uint8 packed [N, ceil(blocks * bits / 8)]
    carried: bool
    #: carried only: share of codes a round-to-nearest re-quantization of the dequantized
    #: weight (same bits / block / symmetry) would change, and that weight's SQNR (dB)
    requant_changed: float | None = None
    requant_sqnr_db: float | None = None


def _key(weight: torch.Tensor) -> str:
    """Content hash of ``Wᵀ`` as the exporter stores it (a float32 ``[K, N]`` constant)."""
    return hashlib.sha1(weight.detach().float().t().contiguous().numpy().tobytes()).hexdigest()


def _check_block(name: str, block: int, k: int) -> None:
    if block < 16 or block & (block - 1) or k % block:
        raise KnowpressError(
            f"{name}: block size {block} must be a power of two >= 16 dividing in_features "
            f"{k} for MatMulNBits; quantize with group_size 32, 64 or 128"
        )


def _swap(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight = nn.Parameter(weight.float().clone(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    setattr(parent, child, linear)  # a new Parameter: a tied embedding keeps its float weight


def _carry(name: str, module: Any) -> Target:
    if module.bits not in NBITS:
        raise KnowpressError(
            f"{name}: {module.bits}-bit codes cannot be carried into MatMulNBits (it runs "
            f"{', '.join(map(str, NBITS))} bits); quantize at 4 or 8 bits or export float32"
        )
    _check_block(name, module.group_size, module.in_features)
    from knowpress.compress.quant.packing import dequantize_groups, quantize_groups, sqnr_db, unpack

    zeros = module.weight_zero_point
    target = Target(
        name,
        module.bits,
        module.group_size,
        module.weight_packed.cpu().numpy(),
        module.weight_scale.float().cpu().numpy(),
        None if zeros is None else zeros.cpu().numpy(),
        carried=True,
    )
    weight = dequantized(target, module.in_features)
    q = quantize_groups(weight, module.bits, module.group_size, module.symmetric)
    codes = unpack(torch.from_numpy(target.packed), target.bits, module.in_features)
    target.requant_changed = float((q.codes != codes).float().mean())
    again = dequantize_groups(
        q.codes, q.scales, q.zeros, module.bits, module.group_size, torch.float32
    )
    target.requant_sqnr_db = sqnr_db(weight, again)
    return target


def _quantize(name: str, linear: nn.Linear, bits: int, block: int, symmetric: bool) -> Target:
    from knowpress.compress.quant.packing import pack, quantize_groups

    _check_block(name, block, linear.in_features)
    q = quantize_groups(linear.weight.detach().float().cpu(), bits, block, symmetric)
    zeros = None if q.zeros is None else pack(q.zeros, bits).numpy()
    return Target(
        name,
        bits,
        block,
        pack(q.codes, bits).numpy(),
        q.scales.float().numpy(),
        zeros,
        carried=False,
    )


def dequantized(target: Target, k: int) -> torch.Tensor:
    from knowpress.compress.quant.packing import dequantize_groups, unpack

    codes = unpack(torch.from_numpy(target.packed), target.bits, k)
    zeros = target.zeros
    if zeros is not None:
        zeros = unpack(torch.from_numpy(zeros), target.bits, k // target.block)
    return dequantize_groups(
        codes, torch.from_numpy(target.scales), zeros, target.bits, target.block, torch.float32
    )


def prepare(
    model: nn.Module, bits: int, block: int, symmetric: bool, ignore: tuple[str, ...]
) -> tuple[dict[str, Target], list[str]]:
    """Swap every target for a float ``nn.Linear`` of its dequantized weight (see the
    module docstring). Packed linears are carried (codes
    as stored), float ones quantized here; names matching ``ignore`` (globs) stay float, and
    so do float linears ``block`` does not divide (``in_features < block``: DeepSeek's
    ``kv_b_proj`` at rank 16). Returns (content hash of Wᵀ -> target, the names kept float
    that way)."""
    from knowpress.compress.quant.qlinear import QuantLinear

    targets: dict[str, Target] = {}
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            target = _carry(name, module)
        elif isinstance(module, nn.Linear) and not any(fnmatch.fnmatch(name, g) for g in ignore):
            if module.in_features % block:
                kept.append(name)
                continue
            target = _quantize(name, module, bits, block, symmetric)
        else:
            continue
        weight = dequantized(target, module.in_features)
        _swap(model, name, weight, module.bias)
        targets[_key(weight)] = target
    return targets, kept


def _node(
    onnx: Any, helper: Any, node: Any, target: Target, prefix: str, accuracy_level: int
) -> tuple[Any, list[Any]]:
    n, k = target.scales.shape[0], target.scales.shape[1] * target.block
    blob = target.block * target.bits // 8
    b = onnx.numpy_helper.from_array(
        target.packed.reshape(n, k // target.block, blob), f"{prefix}.qweight"
    )
    s = onnx.numpy_helper.from_array(target.scales.reshape(-1), f"{prefix}.scales")
    inits, inputs = [b, s], [node.input[0], b.name, s.name]
    if target.zeros is not None:
        z = onnx.numpy_helper.from_array(target.zeros.reshape(-1), f"{prefix}.qzeros")
        inits.append(z)
        inputs.append(z.name)
    new = helper.make_node(
        "MatMulNBits",
        inputs,
        list(node.output),
        name=f"{prefix}.MatMulNBits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=target.bits,
        block_size=target.block,
        accuracy_level=accuracy_level,
    )
    return new, inits


def rewrite(path: Path, targets: dict[str, Target], accuracy_level: int) -> dict[str, Any]:
    """Replace the ``MatMul`` of every target in the graph at ``path`` with ``MatMulNBits``
    (in place; external data rewritten); every target must be found."""
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
        nodes.append(new)
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
    }
    if carried:  # what re-quantizing instead of carrying would have done to those weights
        info["requantize_changed_codes"] = sum(t.requant_changed or 0 for t in carried) / len(
            carried
        )
        info["requantize_min_sqnr_db"] = min(t.requant_sqnr_db or 0 for t in carried)
    return info


def save(model: Any, path: Path) -> None:
    """Save with every tensor in one external data file beside the graph."""
    import onnx

    from knowpress.export.onnx import DATA_FILE
    from knowpress.models.io import _umask

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
