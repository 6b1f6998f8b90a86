"""Fake quantization with learnable step sizes: a packed int layer made trainable, and back.

For a weight ``W`` ``[out, in]`` in groups of ``g`` inputs, each group with a scale ``s``
and a fixed zero point ``z`` (asymmetric: the stored one; symmetric: ``2^(b−1)``, the
offset ``packing.py`` stores codes with), ``b`` bits, ``q_max = 2^b − 1``::

    v   = W / s
    W_q = s · round(clamp(v, −z, q_max − z))     # = s · (clamp(round(v) + z, 0, q_max) − z)

``round`` has a straight-through gradient (Bengio et al. 2013) and ``s`` the LSQ gradient
(Esser et al. 2020, "Learned Step Size Quantization", arXiv:1902.08153)::

    ∂W_q/∂W = 1 if −z ≤ v ≤ q_max − z else 0
    ∂W_q/∂s = round(v) − v  inside,   −z below,   q_max − z above

Inside is inclusive: a weight on the first or last code still learns, as ``torch.clamp``
passes its gradient at the bounds.

What trains is relative to each group's input scale ``s₀`` (the stored one): the weight as
``W = s₀ · u`` (``u`` in grid steps) and the scale as ``s = s₀ · exp(ρ)`` (``ρ`` = 0 at the
start). An AdamW step moves every parameter by about the learning rate, so one ``lr`` then
moves codes by the same share of a grid step, and scales by the same factor, at every width
and magnitude: in raw units a step of 1e-3 was 2 % of an int2 step on a tiny model but half an
int8 step, and 100 % of an int8 scale (measured: KL 0.0001 → 0.107 after 20 steps at int8).
This also stands in for LSQ's gradient scale ``1/√(N·q_max)``, which AdamW's normalisation
would undo. The scale the forward uses is the stored one:
``s`` rounded to the grid's scale dtype (fp16 for ``int``) with a straight-through gradient,
so what trains is exactly what :meth:`FakeQuantLinear.to_packed` stores; the codes come from
``Grid.encode`` (``grids.py`` / ``packing.quantize_with``), the function RTN and GPTQ use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knowpress.tensors.grids import Grid, scale_dtype
from knowpress.tensors.packing import pack, unpack
from knowpress.tensors.qlinear import QuantLinear

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal): a scale never reaches 0


def stored_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``scale`` as the folder stores it (clamped to (0, fp16 max], rounded to ``dtype``),
    in float32, with a straight-through gradient through the rounding."""
    clamped = scale.clamp(FP16_TINY, FP16_MAX)
    return clamped + (clamped.to(dtype).float() - clamped).detach()


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group_size: int) -> torch.Tensor:  # fmt: skip
    """``W_q`` of the module docstring: ``weight`` ``[out, in]``, per-group ``scale`` and
    ``zero`` ``[out, in/g]`` (float32), differentiable in ``weight`` and ``scale``."""
    out_features, in_features = weight.shape
    w = weight.reshape(out_features, in_features // group_size, group_size)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    v = w / s
    clipped = torch.clamp(v, -z, (2**bits - 1) - z)  # gradient 0 outside the code range
    rounded = clipped + (torch.round(clipped) - clipped).detach()  # straight-through round
    return (s * rounded).reshape(out_features, in_features)


class FakeQuantLinear(nn.Module):
    """A ``QuantLinear`` (int grid) made trainable: ``latent`` (the weight in grid steps,
    initialised to the dequantized codes / stored scales) and ``log_scale`` (zeros) are its
    parameters, ``weight()`` and ``scale()`` what they stand for; the zero points stay fixed.
    ``to_packed()`` returns the ``QuantLinear`` it stores."""

    def __init__(self, module: QuantLinear, train_weights: bool) -> None:
        super().__init__()
        if module.grid != "int":
            raise ValueError(f"fake quantization covers the int grid, not {module.grid}")
        self.spec: dict[str, Any] = module.packing_spec()
        self.storage, self.compute_dtype = module.storage, module.compute_dtype
        self.bits, self.group_size = module.bits, module.group_size
        self.symmetric = module.symmetric
        device = module.weight_packed.device
        # [out, in/g]; a zero scale is stored as the smallest fp16 anyway (stored_scale)
        initial = module.weight_scale.float().clamp(FP16_TINY, FP16_MAX)
        self.register_buffer("initial_scale", initial)
        grouped = self._grouped(module.dequantized_weight(torch.float32))
        latent = (grouped / initial.unsqueeze(-1)).reshape(initial.shape[0], -1)
        self.latent = nn.Parameter(latent, requires_grad=train_weights)
        self.log_scale = nn.Parameter(torch.zeros_like(initial))
        groups = module.in_features // module.group_size
        if module.weight_zero_point is None:  # symmetric: the fixed offset of the codes
            zero = torch.full_like(initial, 2.0 ** (module.bits - 1))
        else:
            zero = unpack(module.weight_zero_point, module.bits, groups).float()
        self.register_buffer("zero", zero.to(device))
        self.bias = module.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)  # QAD trains the quantizer, not the rest

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` -> ``[out, in/g, g]`` (a view)."""
        return weight.reshape(weight.shape[0], -1, self.group_size)

    def weight(self) -> torch.Tensor:
        """``W = s₀ · u`` (float32, ``[out, in]``), the scales broadcast over their groups."""
        grouped = self._grouped(self.latent) * self.initial_scale.unsqueeze(-1)
        return grouped.reshape(self.latent.shape)

    def scale(self) -> torch.Tensor:
        """``s = s₀ · exp(ρ)`` (float32, ``[out, in/g]``), before rounding to fp16."""
        return self.initial_scale * self.log_scale.exp()

    def quantized_weight(self) -> torch.Tensor:
        """``W_q`` in float32 at the stored (fp16) scales."""
        scale = stored_scale(self.scale(), scale_dtype("int"))
        return fake_quantize(self.weight(), scale, self.zero, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[out, in]`` of the current weight at the stored scales,
        by the grid's own encoder (the rounding RTN and GPTQ store)."""
        weight = self.weight().detach()
        w = self._grouped(weight)
        scale = stored_scale(self.scale().detach()).unsqueeze(-1)
        zero = None if self.symmetric else self.zero.unsqueeze(-1)
        codes = Grid("int", self.bits, self.symmetric).encode(w, scale, zero)
        return codes.reshape(weight.shape)

    @torch.no_grad()
    def to_packed(self) -> QuantLinear:
        """The ``QuantLinear`` of the same spec holding ``codes()``, the scales cast to the
        grid's scale dtype and the input's zero points."""
        spec = self.spec
        module = QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                             spec["group_size"], spec["symmetric"], spec["bias"],
                             spec["method"], dtype=self.compute_dtype)  # fmt: skip
        module = module.to(self.latent.device)
        module.weight_packed = pack(self.codes(), self.bits)
        module.weight_scale = stored_scale(self.scale().detach()).to(scale_dtype("int"))
        if not self.symmetric:
            module.weight_zero_point = pack(self.zero.to(torch.uint8), self.bits)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        module.storage = self.storage
        return module


def swap_in(model: nn.Module, names: list[str], train_weights: bool) -> None:
    """Replace each ``QuantLinear`` named in ``names`` by its ``FakeQuantLinear``."""
    for name in names:
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name), train_weights))


def pack_back(model: nn.Module) -> list[str]:
    """Replace every ``FakeQuantLinear`` by the ``QuantLinear`` it stores; their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_packed())
    return names
