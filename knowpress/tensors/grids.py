"""Code grids: what a stored code means, and the round-to-nearest onto each.

A packed weight is codes (uint8, packed at ``bits`` by ``packing.pack``), a scale per group and,
for some grids, a zero point or a global scale. The grid says how a code decodes:

- ``int`` (``packing.py``): ``(q − z) · s`` (symmetric: ``z = 2^(b−1)``), 2/3/4/8 bits, fp16
  scales, uint8 zero points (asymmetric only).
- ``fp8``: the code's byte is an e4m3 float, ``Ŵ = e4m3(q) · s`` with ``s = amax / 448``
  (fp32 scales); groups are square blocks (``g × g`` weights: rows and columns, the last row
  block partial; ``g = in`` is one scale per output channel).
- ``nvfp4``: a 4-bit e2m1 code (sign bit 3, magnitude index into 0, .5, 1, 1.5, 2, 3, 4, 6),
  groups of 16, an fp8 e4m3 scale per group and an fp32 global scale per tensor:
  ``Ŵ = e2m1(q) · s / global`` with ``global = 448 · 6 / amax(W)`` and
  ``s = e4m3(amax(group) / 6 · global)``.
- ``mxfp4``: e2m1 codes, groups of 32, a uint8 E8M0 scale ``2^(e − 127)``, no global; the
  scale is the smallest power of two that keeps the group's largest magnitude on the grid.

These are the encodings compressed-tensors stores (``float-quantized``,
``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``). Rounding to e2m1 is to the nearest
value, ties to the even code (compressed-tensors' thresholds); to e4m3 torch's cast (nearest
even), after clamping to ±448. RTN and GPTQ choose codes through :class:`Grid` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knowpress.tensors import packing
from knowpress.tensors.packing import Quantized

GRIDS = ("int", "fp8", "nvfp4", "mxfp4")
#: grid -> (bits, fixed group size or None)
FLOAT_GRIDS = {"fp8": (8, None), "nvfp4": (4, 16), "mxfp4": (4, 32)}
FP8_MAX, FP4_MAX = 448.0, 6.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# (midpoint, tie goes up): the tie goes to the even magnitude index (0, 1, 2, 4 in value)
_E2M1_EDGES = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
               (3.5, True), (5.0, False))  # fmt: skip
_FP8_TINY = 2.0**-9  # smallest positive e4m3 (subnormal): an nvfp4 group scale never 0


def scale_dtype(grid: str) -> torch.dtype:
    return {"int": torch.float16, "fp8": torch.float32, "nvfp4": torch.float8_e4m3fn,
            "mxfp4": torch.uint8}[grid]  # fmt: skip


def is_block(grid: str, group_size: int, in_features: int) -> bool:
    """fp8 groups narrower than the row are square blocks (rows and columns)."""
    return grid == "fp8" and group_size != in_features


def scale_rows(grid: str, out_features: int, group_size: int, in_features: int) -> int:
    """Rows of the stored scale: one per output row, or one per row block (fp8 blocks)."""
    if is_block(grid, group_size, in_features):
        return -(-out_features // group_size)
    return out_features


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """The e2m1 code (uint8, sign in bit 3) nearest to ``x`` (clamped to ±6)."""
    mag = x.abs().clamp(max=FP4_MAX)
    index = torch.zeros_like(mag, dtype=torch.uint8)
    for edge, up in _E2M1_EDGES:
        index += (mag >= edge if up else mag > edge).to(torch.uint8)
    sign = ((x < 0) & (index > 0)).to(torch.uint8) << 3
    return index | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)
    values = table[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -values, values)


def global_scale_of(weight: torch.Tensor) -> torch.Tensor:
    """nvfp4's per-tensor global scale ``448 · 6 / amax`` (fp32 ``[1]``; 1 for a zero tensor)."""
    amax = weight.detach().float().abs().amax()
    scale = FP8_MAX * FP4_MAX / amax if amax > 0 else torch.ones(())
    return scale.reshape(1).float()


@dataclass(frozen=True)
class Grid:
    """The grid one tensor is rounded to. ``row_block``: fp8 blocks share a scale over this
    many rows (params are per row, equal within a block); ``global_scale``: nvfp4's, bound
    to the tensor (broadcastable to the weight's rows)."""

    name: str = "int"
    bits: int = 4
    symmetric: bool = True
    row_block: int | None = None
    global_scale: torch.Tensor | None = None

    @property
    def scale_dtype(self) -> torch.dtype:
        return scale_dtype(self.name)

    def bind(self, weight: torch.Tensor) -> Grid:
        """This grid with the tensor-wide constants of ``weight`` (nvfp4: the global scale)."""
        if self.name != "nvfp4":
            return self
        return Grid(self.name, self.bits, True, None, global_scale_of(weight).to(weight.device))

    def params(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored scales (``scale_dtype``) and zero points (int asymmetric only) of weight
        groups ``[rows, ..., g]`` -> ``[rows, ...]``."""
        if self.name == "int":
            return packing.group_params(groups, self.bits, self.symmetric)
        amax = groups.detach().float().abs().amax(dim=-1)
        if self.name == "fp8":
            if self.row_block:
                rows = amax.shape[0]
                pad = -rows % self.row_block
                padded = torch.nn.functional.pad(amax, (0,) * (2 * (amax.dim() - 1)) + (0, pad))
                blocks = padded.reshape(-1, self.row_block, *amax.shape[1:]).amax(dim=1)
                amax = blocks.repeat_interleave(self.row_block, dim=0)[:rows]
            scale = amax / FP8_MAX
            return torch.where(scale > 0, scale, torch.ones_like(scale)), None
        if self.name == "nvfp4":
            assert self.global_scale is not None, "nvfp4: bind the grid to its tensor first"
            scaled = (amax / FP4_MAX * self._global(amax)).clamp(max=FP8_MAX)
            scale = scaled.to(torch.float8_e4m3fn)
            tiny = torch.tensor(_FP8_TINY, device=amax.device).to(torch.float8_e4m3fn)
            return torch.where(scale.float() > 0, scale, tiny), None
        # mxfp4: the smallest 2^e with amax / 2^e <= 6
        exponent = torch.ceil(torch.log2(amax / FP4_MAX))
        exponent = torch.where(amax > 0, exponent, torch.full_like(amax, -127.0))
        return (exponent.clamp(-127, 127) + 127).to(torch.uint8), None

    def effective(self, scale: torch.Tensor) -> torch.Tensor:
        """The float32 factor a stored scale decodes to (nvfp4: over its global scale)."""
        if self.name == "mxfp4":
            return torch.exp2(scale.float() - 127.0)
        if self.name == "nvfp4":
            return scale.float() / self._global(scale)
        return scale.float()

    def _global(self, like: torch.Tensor) -> torch.Tensor:
        g = self.global_scale
        assert g is not None
        g = g.float().to(like.device)
        return g.reshape(g.shape[0], *([1] * (like.dim() - 1))) if g.numel() > 1 else g

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
               ) -> torch.Tensor:  # fmt: skip
        """Codes (uint8) of ``w`` under per-element stored ``scale`` / ``zero``."""
        if self.name == "int":
            return packing.quantize_with(w, scale, zero, self.bits)
        x = w.detach().float() / self.effective(scale)
        if self.name == "fp8":
            return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return e2m1_encode(x)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
               ) -> torch.Tensor:  # fmt: skip
        """Inverse of :meth:`encode` (float32)."""
        if self.name == "int":
            return packing.dequantize_with(codes, scale, zero, self.bits)
        if self.name == "fp8":
            return codes.view(torch.float8_e4m3fn).float() * self.effective(scale)
        return e2m1_decode(codes) * self.effective(scale)


def expand_rows(scale: torch.Tensor, rows: int, grid: str, group_size: int, in_features: int
                ) -> torch.Tensor:  # fmt: skip
    """Stored scales ``[scale_rows, groups]`` as one row per output row ``[rows, groups]``."""
    if is_block(grid, group_size, in_features):
        return scale.repeat_interleave(group_size, dim=0)[:rows]
    return scale


def quantize(weight: torch.Tensor, grid: Grid, group_size: int) -> Quantized:
    """Round-to-nearest of a 2-D weight ``[out, in]`` onto ``grid`` in groups of
    ``group_size``; scales one row per output row (fp8 blocks: equal within a block),
    ``global_scale`` set for nvfp4."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    if grid.name == "int":
        return packing.quantize_groups(weight, grid.bits, group_size, grid.symmetric)
    if is_block(grid.name, group_size, in_features):
        grid = Grid(grid.name, grid.bits, True, group_size)
    grid = grid.bind(weight)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale, _ = grid.params(w)
    codes = grid.encode(w, scale.unsqueeze(-1), None)
    return Quantized(codes.reshape(out_features, in_features), scale, None, grid.global_scale)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               grid: Grid, group_size: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:  # fmt: skip
    """Inverse of :func:`quantize` on unpacked codes ``[out, in]`` and per-row scales
    ``[out, groups]`` (see :func:`expand_rows`); ``grid.global_scale`` for nvfp4."""
    if grid.name == "int":
        return packing.dequantize_groups(codes, scales, zeros, grid.bits, group_size, dtype)
    out_features, in_features = codes.shape
    q = codes.reshape(out_features, in_features // group_size, group_size)
    w = grid.decode(q, scales.unsqueeze(-1), None)
    return w.reshape(out_features, in_features).to(dtype)


def compact_rows(scale: torch.Tensor, grid: str, group_size: int, in_features: int
                 ) -> torch.Tensor:  # fmt: skip
    """Per-row scales ``[out, groups]`` as stored (fp8 blocks: one row per row block)."""
    if is_block(grid, group_size, in_features):
        return scale[::group_size].contiguous()
    return scale.contiguous()
