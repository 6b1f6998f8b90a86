"""Group-wise integer quantization arithmetic and sub-byte packing.

For a weight ``W`` of shape ``[out, in]`` and group size ``g`` (``in % g == 0``), each row is
split into ``in / g`` groups. Per group, with ``b`` bits:

- asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
  ``q = clamp(round(W / s) + z, 0, 2^b - 1)``, ``Ŵ = (q - z) · s``;
- symmetric: ``s = max|W| / ((2^b - 1) / 2)``, ``q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)``
  stored with the offset ``2^(b-1)``, so ``Ŵ = (q_stored - 2^(b-1)) · s``: every level of the
  signed range is used (compressed-tensors' and GPTQ's convention), the largest magnitude
  landing half a step past the last level.

Scales are stored as float16 ``[out, in / g]``. Codes and zero points are packed densely at
the code width (``pack``): 8-bit one per byte, 4-bit two per byte (low nibble = even column),
3-bit eight per 3 bytes, 2-bit four per byte, the last group zero-padded; so 4-bit zero points
cost ``[out, ceil(in / g / 2)]`` bytes, as in GPTQ's packed ``qzeros``. Bytes per weight at
group 32: 4-bit 0.5 + 2/32 + 0.5/32, 3-bit 0.375 + 2/32 + 0.375/32, 2-bit 0.25 + 2/32 + 0.25/32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Quantized:
    """Codes (unpacked, uint8 ``[out, in]``), scales ``[out, groups]``, zeros or None, and
    nvfp4's per-tensor global scale (``grids.py``; None for other grids)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    global_scale: torch.Tensor | None = None


def group_params(
    groups: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (float16) and zero points (float, None when symmetric) of weight groups
    ``[..., g]`` -> ``[...]`` (see the module docstring)."""
    w = groups.detach().float()
    if symmetric:  # the full range [-2^(b-1), 2^(b-1)-1]: 8 levels at 3 bits, not 7
        return _safe_fp16(w.abs().amax(dim=-1) / ((2**bits - 1) / 2)), None
    qmax = 2**bits - 1
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)  # keep 0 representable: exact zeros stay zero
    scale = _safe_fp16((hi - lo) / qmax)
    return scale, torch.clamp(torch.round(-lo / scale.float()), 0, qmax)


def quantize_with(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Codes (uint8, stored form) of ``weight`` under per-element ``scale`` / ``zero``
    (broadcastable to ``weight``); ``zero`` None means symmetric."""
    w, s = weight.detach().float(), scale.float()
    if zero is None:
        offset = 2 ** (bits - 1)
        return (torch.clamp(torch.round(w / s), -offset, offset - 1) + offset).to(torch.uint8)
    return torch.clamp(torch.round(w / s) + zero, 0, 2**bits - 1).to(torch.uint8)


def dequantize_with(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_with` (float32)."""
    offset = 2.0 ** (bits - 1) if zero is None else zero.float()
    return (codes.float() - offset) * scale.float()


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """Round-to-nearest group-wise quantization of a 2-D weight (see module docstring)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale, zero = group_params(w, bits, symmetric)
    codes = quantize_with(
        w, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits
    )
    zeros = None if zero is None else zero.to(torch.uint8)
    return Quantized(codes.reshape(out_features, in_features), scale, zeros)


def _safe_fp16(scale: torch.Tensor) -> torch.Tensor:
    """float16 scales, with all-zero groups given scale 1 (any code then decodes to 0)."""
    scale = scale.clamp(max=65504.0).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def dequantize_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (codes unpacked), returning ``[out, in]``."""
    out_features, in_features = codes.shape
    q = codes.reshape(out_features, in_features // group_size, group_size)
    zero = None if zeros is None else zeros.unsqueeze(-1)
    w = dequantize_with(q, scales.unsqueeze(-1), zero, bits)
    return w.reshape(out_features, in_features).to(dtype)


PACKED_BITS = (2, 3, 4, 8)
# bits -> (codes, bytes) of one packing group: 4 two-bit codes in a byte, 8 three-bit codes
# in 3 bytes, 2 nibbles in a byte, 1 code per byte; no bit is wasted inside a group.
_GROUPS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def packed_width(length: int, bits: int) -> int:
    """Bytes per row of ``length`` codes packed at ``bits`` (the last group zero-padded)."""
    if bits not in _GROUPS:
        raise ValueError(f"packing supports {', '.join(map(str, PACKED_BITS))} bits, not {bits}")
    codes, nbytes = _GROUPS[bits]
    return -(-length // codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., n]`` into ``[..., packed_width(n, bits)]`` bytes, little-endian
    within a group: code ``j`` of a group occupies bits ``j·b .. j·b+b-1``."""
    packed_width(codes.shape[-1], bits)  # validates bits
    if bits == 8:
        return codes.contiguous()
    per, nbytes = _GROUPS[bits]
    pad = -codes.shape[-1] % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    word = (groups << shifts).sum(dim=-1)  # at most 24 bits: fits int32
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, length: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`; ``length`` drops the padding of the last group."""
    if bits == 8:
        return packed if length is None else packed[..., :length]
    per, nbytes = _GROUPS[bits]
    chunks = packed.reshape(*packed.shape[:-1], -1, nbytes).to(torch.int32)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
    word = (chunks << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = ((word >> shifts) & (2**bits - 1)).to(torch.uint8)
    codes = codes.reshape(*packed.shape[:-1], -1)
    return codes if length is None else codes[..., :length]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖W‖² / ‖W − Ŵ‖²)`` in dB."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
