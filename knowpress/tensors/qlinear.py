"""``QuantLinear``: a linear layer whose weight is stored packed (see ``packing.py``, ``grids.py``).

Buffers (what lands in safetensors): ``weight_packed`` uint8 ``[out, ⌈in·b/8⌉]`` (codes of the
module's ``grid``), ``weight_scale`` ``[out, in/g]`` in the grid's scale dtype (int fp16, fp8
fp32 — ``[⌈out/g⌉, in/g]`` for square blocks —, nvfp4 e4m3, mxfp4 uint8 E8M0),
``weight_zero_point`` uint8 ``[out, ⌈(in/g)·b/8⌉]`` (asymmetric int only; packed at the code
width like the codes), ``weight_global_scale`` fp32 ``[1]`` (nvfp4 only) and an optional
``bias``. The forward pass dequantizes on the fly, so memory holds only the packed form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knowpress.tensors.grids import (
    Grid,
    compact_rows,
    dequantize,
    expand_rows,
    scale_dtype,
    scale_rows,
)
from knowpress.tensors.packing import Quantized, pack, packed_width, unpack

_TAGS = {torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
         torch.uint8: "U8"}  # fmt: skip


class QuantLinear(nn.Module):
    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        method: str,
        dtype: torch.dtype = torch.float32,
        grid: str = "int",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.method = (
            bits,
            group_size,
            symmetric,
            method,
        )
        self.grid = grid
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8),
        )
        rows = scale_rows(grid, out_features, group_size, in_features)
        self.register_buffer("weight_scale", torch.ones(rows, groups).to(scale_dtype(grid)))
        if symmetric:
            self.weight_zero_point: torch.Tensor | None = None
        else:
            self.register_buffer(
                "weight_zero_point",
                torch.zeros(out_features, packed_width(groups, bits), dtype=torch.uint8),
            )
        if grid == "nvfp4":
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32))
        else:
            self.weight_global_scale: torch.Tensor | None = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.compute_dtype = dtype
        #: the folder format it is saved in: knowpress-packed, or compressed-tensors (stock)
        self.storage = "knowpress"

    @classmethod
    def from_quantized(
        cls, linear: nn.Linear, q: Quantized, bits: int, group_size: int, method: str,
        grid: str = "int", weight: torch.Tensor | None = None,
    ) -> QuantLinear:  # fmt: skip
        """``linear`` quantized as ``q``; ``weight``: what stands for its weight when it has
        none (the dtype and device the module takes)."""
        weight = linear.weight if weight is None else weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            symmetric=q.zeros is None,
            bias=linear.bias is not None,
            method=method,
            dtype=weight.dtype,
            grid=grid,
        )
        module.weight_packed = pack(q.codes, bits)
        scales = compact_rows(q.scales, grid, group_size, linear.in_features)
        module.weight_scale = scales.to(scale_dtype(grid))
        if q.zeros is not None:
            module.weight_zero_point = pack(q.zeros, bits)
        if q.global_scale is not None:
            module.weight_global_scale = q.global_scale.reshape(1).float().clone()
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module.to(weight.device)

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        """A module of the right shapes to receive a packed state dict (see ``packing_spec``)."""
        if (spec["in_features"], spec["out_features"]) != (linear.in_features, linear.out_features):
            raise ValueError(f"packed shape {spec} does not match {linear}")
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            spec["symmetric"],
            spec["bias"],
            spec["method"],
            dtype=dtype,
            grid=spec.get("grid", "int"),
        )

    @staticmethod
    def entries(
        prefix: str, out_features: int, in_features: int, bits: int, group_size: int,
        symmetric: bool, grid: str = "int",
    ) -> list[tuple[str, str, tuple[int, ...]]]:  # fmt: skip
        """(name, dtype tag, shape) of the packed tensors this layer stores (bias apart)."""
        groups = in_features // group_size
        rows = scale_rows(grid, out_features, group_size, in_features)
        entries = [
            (f"{prefix}.weight_packed", "U8", (out_features, packed_width(in_features, bits))),
            (f"{prefix}.weight_scale", _TAGS[scale_dtype(grid)], (rows, groups)),
        ]
        if not symmetric:
            zeros = (out_features, packed_width(groups, bits))
            entries.append((f"{prefix}.weight_zero_point", "U8", zeros))
        if grid == "nvfp4":
            entries.append((f"{prefix}.weight_global_scale", "F32", (1,)))
        return entries

    def packing_spec(self) -> dict[str, Any]:
        spec = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "method": self.method,
        }
        return spec if self.grid == "int" else {**spec, "grid": self.grid}

    def logical_parameters(self) -> int:
        return self.in_features * self.out_features + (
            self.bias.numel() if self.bias is not None else 0
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes = unpack(self.weight_packed, self.bits, self.in_features)
        zeros = self.weight_zero_point
        if zeros is not None:
            zeros = unpack(zeros, self.bits, self.in_features // self.group_size)
        grid = Grid(self.grid, self.bits, self.symmetric, None, self.weight_global_scale)
        scales = expand_rows(self.weight_scale, self.out_features, self.grid, self.group_size,
                             self.in_features)  # fmt: skip
        return dequantize(codes, scales, zeros, grid, self.group_size, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        code = f"int{self.bits}" if self.grid == "int" else self.grid
        return (
            f"in={self.in_features}, out={self.out_features}, {self.method} {code} "
            f"g{self.group_size} {kind}"
        )
