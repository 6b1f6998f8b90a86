"""The quantization-method family: a registry of method configs.

A method's config is a frozen pydantic model discriminated by ``name``; its hyperparameters
are its fields. ``check_target`` says why a target cannot be quantized (before any work),
``stored_entries`` what the method will store for it (the byte prediction the stage checks
the saved folder against), and ``apply`` quantizes every target. The base ``apply`` turns
each linear target into a packed ``QuantLinear`` with ``quantize_linear``; methods that
need calibration data (GPTQ) override ``apply``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from knowpress.core.config import FrozenConfig
from knowpress.core.registry import Registry

#: calibration batches for a model of ``max_positions``: ``[B, T]`` token ids (lazy: the
#: pipeline reads and tokenizes its calibration text only for a method that asks)
Calibration = Callable[[int], "list[torch.Tensor]"]

if TYPE_CHECKING:
    from knowpress.arch.sequential import Onload
    from knowpress.core.progress import Progress
    from knowpress.formats.sizes import Entry
    from knowpress.methods.quant.targets import Target
    from knowpress.tensors.grids import Grid
    from knowpress.tensors.packing import Quantized
    from knowpress.tensors.qlinear import QuantLinear


class QuantMethod(FrozenConfig):
    name: str

    def check_target(self, target: Target) -> str | None:
        """A reason this method cannot quantize ``target``, or None (2-D linear weights)."""
        shape = list(target.shape)
        if target.kind == "fused_experts":
            return (
                f"{target.name} is a fused 3-D expert tensor {shape}; {self.name} quantizes "
                f"2-D linear weights only: add '{target.module}' (or '*.experts') to "
                f"quantize.ignore to keep the experts in the stored dtype"
            )
        if target.kind != "linear":
            return (
                f"{target.name} {shape} is not a linear layer's weight ({target.kind}); "
                f"{self.name} quantizes linear layers only: remove it from quantize.targets"
            )
        if target.tied:
            return (
                f"{target.name} is tied to another module's weight; quantizing it would store "
                f"a second copy: add '{target.module}' to quantize.ignore"
            )
        out_features, in_features = target.shape
        return self.check_linear(target.name, out_features, in_features)

    def check_linear(self, name: str, out_features: int, in_features: int) -> str | None:
        """Shape constraints of the method on one ``[out, in]`` weight."""
        return None

    def stored_entries(self, target: Target) -> list[Entry]:
        """(name, dtype tag, shape) of every tensor the method stores for ``target``."""
        raise NotImplementedError

    def quantize_linear(self, linear: nn.Linear) -> QuantLinear:
        raise NotImplementedError

    def apply(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        calibration: Calibration,
        progress: Progress,
        plan: Mapping[str, QuantMethod] | None = None,
        onload: Onload | None = None,
    ) -> dict[str, Any]:
        """Quantize every target in ``model``; ``plan`` maps a target name to the settings it
        takes instead of this method's (``plan.py``); ``calibration`` gives data-aware
        methods their batches and ``onload`` where their block-wise passes run (default: the
        model's own device and dtypes). Returns the method's figures for the stage details."""
        raise NotImplementedError


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself, or for a layer packed by an earlier stage a float ``nn.Linear``
    holding its dequantized weight: a chain re-quantizes what is stored (int8 -> int4),
    never the original float weights, which are gone."""
    dequantize = getattr(module, "dequantized_weight", None)
    if not callable(dequantize):
        return module  # type: ignore[return-value]
    weight = dequantize()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear = linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class GroupWise(QuantMethod):
    """Methods that store a ``QuantLinear``: ``bits``-bit codes in groups of ``group_size``
    inputs (None: one group per row), symmetric by default (as GPTQModel and llm-compressor's
    W4A16: no zero points). ``dtype`` is the code grid (``tensors/grids.py``): ``int``, or
    ``fp8`` (8 bits; ``group_size`` null = per output channel, N = N×N blocks), ``nvfp4``
    (4 bits, groups of 16, fp8 scales, a global scale) and ``mxfp4`` (4 bits, groups of 32,
    power-of-two scales), which fix their bits and group size and are symmetric."""

    bits: Literal[2, 3, 4, 8] = 8
    group_size: int | None = Field(
        128, gt=0, description="weights per scale; null = one scale per output row"
    )
    symmetric: bool = Field(
        True, description="codes around 0 with no zero point (false: asymmetric, +zero points)"
    )
    expert_bits: list[Literal[2, 3, 4, 8]] | None = Field(
        None, description="fused expert tensors: bits per expert (set by an MoE bits_plan)"
    )
    dtype: Literal["int", "fp8", "nvfp4", "mxfp4"] = Field(
        "int", description="code grid: int | fp8 (e4m3) | nvfp4 | mxfp4 (e2m1 codes)"
    )

    @model_validator(mode="before")
    @classmethod
    def _grid_defaults(cls, data: Any) -> Any:
        """A float grid's bits and group size, unless the recipe gives them."""
        from knowpress.tensors.grids import FLOAT_GRIDS

        if isinstance(data, dict) and data.get("dtype") in FLOAT_GRIDS:
            bits, group = FLOAT_GRIDS[data["dtype"]]
            data = {"bits": bits, "group_size": group, **data}
        return data

    @model_validator(mode="after")
    def _grid_fits(self) -> GroupWise:
        problem = self.grid_problem()
        if problem:
            raise ValueError(problem)
        return self

    def grid_problem(self) -> str | None:
        """Why these settings do not fit the code grid (a plan rule can change them)."""
        from knowpress.tensors.grids import FLOAT_GRIDS

        if self.dtype == "int":
            return None
        bits, group = FLOAT_GRIDS[self.dtype]
        if self.bits != bits:
            return f"dtype {self.dtype} stores {bits}-bit codes, not bits: {self.bits}"
        if group is not None and self.group_size != group:
            return f"dtype {self.dtype} has groups of {group}, not group_size: {self.group_size}"
        if not self.symmetric:
            return f"dtype {self.dtype} is symmetric (no zero points): drop symmetric: false"
        if self.expert_bits:
            return f"expert_bits (a bits_plan) needs dtype int, not {self.dtype}"
        return None

    def grid(self) -> Grid:
        from knowpress.tensors.grids import Grid

        return Grid(self.dtype, self.bits, self.symmetric)

    def quantize_weight(self, weight: torch.Tensor, bits: int | None = None) -> Quantized:
        """Round-to-nearest of a 2-D ``[out, in]`` weight on this method's grid."""
        from knowpress.tensors.grids import Grid, quantize

        grid = Grid(self.dtype, bits or self.bits, self.symmetric)
        return quantize(weight, grid, self.group(weight.shape[1]))

    def bits_of(self, expert: int) -> int:
        """The width expert ``expert`` of a fused tensor is stored at."""
        return self.expert_bits[expert] if self.expert_bits else self.bits

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def check_target(self, target: Target) -> str | None:
        problem = self.grid_problem()
        if problem:
            return f"{target.name}: {problem}"
        if self.dtype != "int" and target.kind == "embedding":
            return (f"{target.name}: embedding tables are packed on the int grid only, not "
                    f"{self.dtype}: leave model.embed_tokens out of the targets")  # fmt: skip
        if (
            self.dtype == "fp8"
            and target.kind == "fused_experts"
            and self.group_size
            and (self.group_size != target.shape[2])
        ):
            return (f"{target.name}: fp8 blocks on fused experts are not supported; use "
                    f"group_size: null (one scale per output channel) for them")  # fmt: skip
        if target.kind == "fused_experts":  # [E, out, in]: each expert's matrix, own scales
            if self.expert_bits and len(self.expert_bits) != target.shape[0]:
                return (f"expert_bits has {len(self.expert_bits)} widths for the "
                        f"{target.shape[0]} experts of {target.name}")  # fmt: skip
            return self.check_linear(target.name, target.shape[1], target.shape[2])
        if self.expert_bits:
            kind = target.kind.replace("_", " ")
            return (f"expert_bits applies to fused MoE expert tensors; {target.name} is a "
                    f"{kind}: narrow the targets or drop expert_bits")  # fmt: skip
        if target.kind == "embedding":  # [V, H]: one row per token
            return self.check_linear(target.name, target.shape[0], target.shape[1])
        if target.kind == "linear" and target.tied:
            return (
                f"{target.name} is tied to the input embedding: target the embedding "
                f"(model.embed_tokens) instead, and the head follows it with one stored copy"
            )
        return super().check_target(target)

    def check_linear(self, name: str, out_features: int, in_features: int) -> str | None:
        g = self.group(in_features)
        if in_features % g:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            return (
                f"group_size {g} does not divide in_features {in_features} of {name}; "
                f"use one of {divisors or [in_features]} or null (per row)"
            )
        return None

    def stored_entries(self, target: Target) -> list[Entry]:
        from knowpress.tensors.qexperts import entries
        from knowpress.tensors.qlinear import QuantLinear

        if target.kind == "fused_experts":
            return entries(target.name, target.shape, self.bits, self.group(target.shape[2]),
                           self.symmetric, self.expert_bits, self.dtype)  # fmt: skip
        if target.kind == "embedding":
            rows, cols = target.shape
            return QuantLinear.entries(target.module, rows, cols, self.bits, self.group(cols),
                                       self.symmetric)  # fmt: skip
        out_features, in_features = target.shape
        return QuantLinear.entries(target.module, out_features, in_features, self.bits,
                                   self.group(in_features), self.symmetric, self.dtype)  # fmt: skip

    def apply(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        calibration: Calibration,
        progress: Progress,
        plan: Mapping[str, QuantMethod] | None = None,
        onload: Onload | None = None,
    ) -> dict[str, Any]:
        """Linear targets through ``quantize_linear``; fused expert tensors and embedding
        tables with the same group-wise rounding (``round_target``)."""

        for target in progress.track(list(targets), f"{self.name}: quantizing"):
            method = (plan or {}).get(target.name, self)
            assert isinstance(method, GroupWise)
            if target.kind == "linear":
                module = model.get_submodule(target.module)
                model.set_submodule(target.module, method.quantize_linear(as_linear(module)))
            else:
                method.round_target(model, target)
        return {}

    def round_target(self, model: nn.Module, target: Target) -> None:
        """Round a fused expert tensor (expert by expert) or an embedding table (row by row)
        to this method's grid, and install its packed form."""
        from knowpress.tensors.qembed import install_embedding
        from knowpress.tensors.qexperts import current_weight, install, joined, spec_for

        module = model.get_submodule(target.module)
        if target.kind == "embedding":
            install_embedding(model, target.module, self.bits, self.group(target.shape[1]),
                              self.symmetric, self.name)  # fmt: skip
            return
        weight = current_weight(module, target.attribute)
        g = self.group(weight.shape[2])
        spec = spec_for(weight, self.bits, g, self.symmetric, self.name, self.expert_bits,
                        self.dtype)  # fmt: skip
        parts = [self.quantize_weight(weight[e], self.bits_of(e)) for e in range(weight.shape[0])]
        install(module, target.attribute, spec, parts if self.expert_bits else joined(parts))


QUANT_METHODS: Registry[type[QuantMethod]] = Registry("quant method")
