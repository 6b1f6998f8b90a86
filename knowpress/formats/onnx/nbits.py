"""Block-wise low-bit weights in the graph: onnxruntime's ``com.microsoft.MatMulNBits``.

``Y = A · dequant(B)ᵀ``: ``B`` uint8 ``[N, ceil(K / block), block · bits / 8]`` (codes
packed low-bits-first along K, a partial last block padded), ``scales`` float ``[N ·
ceil(K / block)]`` (A's dtype), ``zero_points`` uint8 ``[N · ceil(ceil(K / block) · bits /
8)]`` packed the same way (absent: ``2^(bits-1)``), ``dequant = (code - zero) · scale``;
``block`` a power of two >= 16 (onnxruntime 1.32 on CPU runs any K, the padding ignored:
``tests/export/test_nbits_groups.py``). knowpress's ``QuantLinear`` stores exactly this
(``tensors/packing.py``: 4-bit low nibble = even column, symmetric codes offset by
``2^(bits-1)``, zero points packed at the code width per row), so codes the quantize stage
chose (GPTQ) are *carried* byte for byte: only scales widen from fp16 to float32.

The quantize stage's group size need not be such a block (``plan.py``'s fallback: the
largest divisor of the width between 16 and the group, else one group per row — 172 has
neither a power-of-two divisor >= 16 nor a divisor in [16, 32]). The codes are still
carried unchanged (``carry_block``), each block inside one group taking that group's scale
and zero point: a group that is a multiple of a power of two >= 16 (48 -> blocks of 16) is
*re-blocked*, its scale repeated; one group per row (172) is one row of padded blocks;
several groups per row of another size (43 or 86 on 172) are *sliced*: one MatMulNBits per
group over its columns of ``A`` (``Slice``), summed (``Sum``), at most ``MAX_SLICES``.
Codes none of these holds (a group under 16 with more than ``MAX_SLICES`` groups per row)
are *kept float*: a MatMul of their dequantized weight, exact but 4-8x the bytes; every
such layer is named in the export details. Float linears are quantized here by
round-to-nearest (``quantize_groups``) at ``bits`` / ``block_size`` / ``symmetric``, with a
padded last block where ``block_size`` does not divide in_features.

``accuracy_level`` is the minimum precision of the matmul's inputs (0 unset, 1 fp32,
2 fp16, 3 bf16, 4 int8): at 4 the CPU kernel quantizes each block of ``A`` to int8 and
uses integer dot products, which is what makes int4 fast on CPU (onnxruntime-genai#406:
int4 at 1.64 tok/s vs fp32 10.67 before it) at the cost of activation rounding.

The flow: ``prepare`` replaces every target (``QuantLinear`` or float ``nn.Linear``) in the
PyTorch model with an ``nn.Linear`` holding the *dequantized* weight, so the float graph and
the parity reference compute what the low-bit graph computes; after export, ``rewrite``
finds each ``MatMul`` whose constant operand is such a weight (transposed, by content hash)
and swaps it for ``MatMulNBits`` (or its slices).
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from knowpress.core.errors import KnowpressError

NBITS = (4, 8)  # widths MatMulNBits runs on CPU
MIN_BLOCK = 16  # MatMulNBits' smallest block_size
MAX_SLICES = 16  # groups per row carried as one MatMulNBits each before a layer stays float


@dataclass
class Part:
    """One ``MatMulNBits``: columns ``[start, start + k)`` of the linear's input, in the
    op's layout (the last block padded where ``block`` does not divide ``k``)."""

    start: int
    k: int
    block: int  # MatMulNBits block_size
    packed: np.ndarray  # uint8 [N, ceil(k / block), block * bits / 8]
    scales: np.ndarray  # float32 [N, ceil(k / block)]
    zeros: np.ndarray | None  # uint8 packed [N, ceil(blocks * bits / 8)]; None: 2^(bits-1)


@dataclass
class Target:
    """One linear as MatMulNBits holds it: one part, or one per group (sliced)."""

    name: str
    bits: int
    k: int  # in_features
    parts: list[Part]
    carried: bool
    #: carried only: the quantize stage's group size
    group: int | None = None
    #: carried only: share of codes a round-to-nearest re-quantization of the dequantized
    #: weight (same bits / group / symmetry) would change, and that weight's SQNR (dB)
    requant_changed: float | None = None
    requant_sqnr_db: float | None = None


@dataclass
class Layout:
    """What ``prepare`` did with each packed linear that is not a plain carry."""

    #: carried at another block than their group, or sliced: name -> how
    reblocked: dict[str, str] = field(default_factory=dict)
    #: packed linears no MatMulNBits layout holds: a float MatMul of the dequantized weight
    kept_float: dict[str, str] = field(default_factory=dict)


def _key(weight: torch.Tensor) -> str:
    """Content hash of ``Wᵀ`` as the exporter stores it (a float32 ``[K, N]`` constant)."""
    return hashlib.sha1(weight.detach().float().t().contiguous().numpy().tobytes()).hexdigest()


def _row_bytes(k: int, block: int, bits: int, symmetric: bool) -> int:
    """Bytes one output row takes in MatMulNBits at ``block`` (codes, fp32 scales, zeros)."""
    blocks = -(-k // block)
    zeros = 0 if symmetric else -(-blocks * bits // 8)
    return blocks * (block * bits // 8 + 4) + zeros


def carry_block(group: int, k: int, bits: int, symmetric: bool) -> int | None:
    """The MatMulNBits block (a power of two >= 16) that holds codes quantized in groups of
    ``group`` along ``k`` unchanged, every block inside one group: the group itself when it
    is such a power of two; for one group per row (``group == k``, e.g. 172) the block of
    fewest bytes, its last block padded; else the largest power of two dividing the group
    (48 -> 16: each group's scale repeated over its blocks). None when no block can (a
    group under 16, or several groups per row of a size no power of two >= 16 divides)."""
    if group >= MIN_BLOCK and not group & (group - 1):
        return group
    if group == k:
        sizes = [MIN_BLOCK << i for i in range(max(1, (k - 1).bit_length() - 3))]
        return min(sizes, key=lambda b: (_row_bytes(k, b, bits, symmetric), b * -(-k // b)))
    block = group & -group
    return block if block >= MIN_BLOCK else None


def _swap(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight = nn.Parameter(weight.float().clone(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    setattr(parent, child, linear)  # a new Parameter: a tied embedding keeps its float weight


def _blocked(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
    group: int, block: int, start: int = 0,
) -> Part:  # fmt: skip
    """``codes`` uint8 ``[N, K]`` (stored form), ``scales`` / ``zeros`` (unpacked) per group of
    ``group`` columns, laid out at ``block``: block ``j`` takes the scale and zero point of the
    group holding its first column (``carry_block`` makes every block lie in one group), the
    last block padded with codes that decode to 0."""
    from knowpress.tensors.packing import pack

    n, k = codes.shape
    blocks = -(-k // block)
    index = torch.arange(blocks) * block // group
    scale = scales.float()[:, index]
    zero = None if zeros is None else zeros[:, index].contiguous()
    pad = blocks * block - k
    if pad:
        fill = (
            torch.full((n, pad), 2 ** (bits - 1), dtype=torch.uint8)
            if zero is None
            else zero[:, -1:].expand(n, pad)
        )
        codes = torch.cat([codes, fill], dim=1)
    packed = pack(codes, bits).reshape(n, blocks, block * bits // 8)
    return Part(
        start,
        k,
        block,
        packed.numpy(),
        scale.numpy(),
        None if zero is None else pack(zero, bits).numpy(),
    )


def _carry(name: str, module: Any) -> tuple[Target | None, str | None]:
    """The module's codes as MatMulNBits holds them, and how when not at its own group
    (re-blocked or sliced); (None, why) when no layout holds them."""
    from knowpress.tensors.packing import dequantize_groups, quantize_groups, sqnr_db, unpack

    k, group, bits = module.in_features, module.group_size, module.bits
    codes = unpack(module.weight_packed.cpu(), bits, k)
    scales = module.weight_scale.cpu()
    zeros = module.weight_zero_point
    zeros = None if zeros is None else unpack(zeros.cpu(), bits, k // group)
    block = carry_block(group, k, bits, module.symmetric)
    how = None
    if block is not None:
        parts = [_blocked(codes, scales, zeros, bits, group, block)]
        if block != group:
            how = f"group {group} -> block {block}"
    elif k // group <= MAX_SLICES:  # one MatMulNBits per group: each one group per row
        block = carry_block(group, group, bits, module.symmetric)
        assert block is not None
        parts = []
        for i in range(k // group):
            columns, one = slice(i * group, (i + 1) * group), slice(i, i + 1)
            zero = None if zeros is None else zeros[:, one]
            parts.append(
                _blocked(codes[:, columns], scales[:, one], zero, bits, group, block, i * group)
            )
        how = f"group {group} -> {k // group} slices of {group} columns at block {block}"
    else:
        return None, (
            f"group {group}: no power-of-two block >= 16 holds it, and {k // group} groups per "
            f"row are more than {MAX_SLICES} slices"
        )
    target = Target(name, bits, k, parts, carried=True, group=group)
    weight = dequantized(target)
    q = quantize_groups(weight, bits, group, module.symmetric)
    target.requant_changed = float((q.codes != codes).float().mean())
    again = dequantize_groups(q.codes, q.scales, q.zeros, bits, group, torch.float32)
    target.requant_sqnr_db = sqnr_db(weight, again)
    return target, how


def _quantize(name: str, linear: nn.Linear, bits: int, block: int, symmetric: bool) -> Target:
    """Round-to-nearest at ``block``; a ``block`` that does not divide in_features leaves a
    partial last block (the weight padded with zeros, which change no scale)."""
    from knowpress.tensors.packing import quantize_groups

    weight = linear.weight.detach().float().cpu()
    k = weight.shape[1]
    q = quantize_groups(torch.nn.functional.pad(weight, (0, -k % block)), bits, block, symmetric)
    part = _blocked(q.codes[:, :k], q.scales, q.zeros, bits, block, block)
    return Target(name, bits, k, [part], carried=False)


def _dequantized_part(part: Part, bits: int) -> torch.Tensor:
    from knowpress.tensors.packing import dequantize_with, unpack

    n, blocks, _ = part.packed.shape
    codes = unpack(torch.from_numpy(part.packed).reshape(n, -1), bits, part.k)
    scale = torch.from_numpy(part.scales).repeat_interleave(part.block, dim=1)[:, : part.k]
    zero = None
    if part.zeros is not None:
        zero = unpack(torch.from_numpy(part.zeros), bits, blocks)
        zero = zero.repeat_interleave(part.block, dim=1)[:, : part.k]
    return dequantize_with(codes, scale, zero, bits)


def dequantized(target: Target) -> torch.Tensor:
    """The float32 ``[N, K]`` weight ``target`` computes (as ``QuantLinear`` dequantizes)."""
    return torch.cat([_dequantized_part(p, target.bits) for p in target.parts], dim=1)


def dequantize_packed(model: nn.Module) -> list[str]:
    """Swap every ``QuantLinear`` for an ``nn.Linear`` of its dequantized float32 weight
    (``weights: float32`` / ``int8`` on a packed model); the names swapped."""
    from knowpress.tensors.qlinear import QuantLinear

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            _swap(model, name, module.dequantized_weight(torch.float32), module.bias)
            names.append(name)
    return names


def prepare(
    model: nn.Module, bits: int, block: int, symmetric: bool, ignore: tuple[str, ...]
) -> tuple[dict[str, Target], Layout]:
    """Swap every target for a float ``nn.Linear`` of its dequantized weight (see the
    module docstring). Packed linears are carried (codes as stored: at their group, re-blocked
    or sliced), or, when no layout holds their codes, kept float as their dequantized weight;
    float ones are quantized here at ``block``; names matching ``ignore`` (globs) stay float
    (packed linears are carried whatever ``ignore`` says). Returns (content hash of Wᵀ ->
    target, the layout)."""
    from knowpress.tensors.qlinear import QuantLinear

    targets: dict[str, Target] = {}
    layout = Layout()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            if module.grid != "int":
                raise KnowpressError(
                    f"{name}: {module.grid} codes are not integers, which MatMulNBits runs; "
                    "export weights: float32 (the dequantized weights) or quantize with "
                    "dtype: int"
                )
            if module.bits not in NBITS:
                raise KnowpressError(
                    f"{name}: {module.bits}-bit codes cannot be carried into MatMulNBits (it "
                    f"runs {', '.join(map(str, NBITS))} bits); quantize at 4 or 8 bits or "
                    "export weights: float32 (the dequantized weights)"
                )
            target, how = _carry(name, module)
            if target is None:
                layout.kept_float[name] = str(how)
                _swap(model, name, module.dequantized_weight(torch.float32), module.bias)
                continue
            if how:
                layout.reblocked[name] = how
        elif isinstance(module, nn.Linear) and not any(fnmatch.fnmatch(name, g) for g in ignore):
            target = _quantize(name, module, bits, block, symmetric)
        else:
            continue
        weight = dequantized(target)
        _swap(model, name, weight, module.bias)
        targets[_key(weight)] = target
    return targets, layout
