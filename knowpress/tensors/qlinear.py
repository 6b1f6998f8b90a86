"""``QuantLinear``: a linear layer whose weight is stored packed (see ``packing.py``).

Buffers (what lands in safetensors): ``weight_packed`` uint8 ``[out, ⌈in·b/8⌉]``,
``weight_scale`` float16 ``[out, in/g]``, ``weight_zero_point`` uint8 ``[out, ⌈(in/g)·b/8⌉]``
(asymmetric only; packed at the code width like the codes), and an optional ``bias``. The
forward pass dequantizes on the fly, so memory holds only the packed form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knowpress.tensors.packing import (
    Quantized,
    dequantize_groups,
    pack,
    packed_width,
    unpack,
)


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
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.method = (
            bits,
            group_size,
            symmetric,
            method,
        )
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8),
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16))
        if symmetric:
            self.weight_zero_point: torch.Tensor | None = None
        else:
            self.register_buffer(
                "weight_zero_point",
                torch.zeros(out_features, packed_width(groups, bits), dtype=torch.uint8),
            )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.compute_dtype = dtype
        #: the folder format it is saved in: knowpress-packed, or compressed-tensors (stock)
        self.storage = "knowpress"

    @classmethod
    def from_quantized(
        cls, linear: nn.Linear, q: Quantized, bits: int, group_size: int, method: str
    ) -> QuantLinear:
        module = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            symmetric=q.zeros is None,
            bias=linear.bias is not None,
            method=method,
            dtype=linear.weight.dtype,
        )
        module.weight_packed = pack(q.codes, bits)
        module.weight_scale = q.scales.contiguous()
        if q.zeros is not None:
            module.weight_zero_point = pack(q.zeros, bits)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module.to(linear.weight.device)

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
        )

    @staticmethod
    def entries(
        prefix: str, out_features: int, in_features: int, bits: int, group_size: int,
        symmetric: bool,
    ) -> list[tuple[str, str, tuple[int, ...]]]:  # fmt: skip
        """(name, dtype tag, shape) of the packed tensors this layer stores (bias apart)."""
        groups = in_features // group_size
        entries = [
            (f"{prefix}.weight_packed", "U8", (out_features, packed_width(in_features, bits))),
            (f"{prefix}.weight_scale", "F16", (out_features, groups)),
        ]
        if not symmetric:
            zeros = (out_features, packed_width(groups, bits))
            entries.append((f"{prefix}.weight_zero_point", "U8", zeros))
        return entries

    def packing_spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "method": self.method,
        }

    def logical_parameters(self) -> int:
        return self.in_features * self.out_features + (
            self.bias.numel() if self.bias is not None else 0
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes = unpack(self.weight_packed, self.bits, self.in_features)
        zeros = self.weight_zero_point
        if zeros is not None:
            zeros = unpack(zeros, self.bits, self.in_features // self.group_size)
        return dequantize_groups(
            codes,
            self.weight_scale,
            zeros,
            self.bits,
            self.group_size,
            dtype or self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (
            f"in={self.in_features}, out={self.out_features}, {self.method} int{self.bits} "
            f"g{self.group_size} {kind}"
        )
