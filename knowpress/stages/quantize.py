"""``kind: quantize`` — weight-only quantization of the model's linear layers.

Targets every ``nn.Linear`` whose qualified name matches none of the ``ignore`` globs (the
output head by default: tied to the embedding in small models, and the most
quantization-sensitive layer). The method (``rtn`` ...) comes from ``QUANT_METHODS``.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal, Union

import torch
from pydantic import Field
from torch import nn

from knowpress.compress.quant import QUANT_METHODS
from knowpress.compress.quant.qlinear import QuantLinear
from knowpress.context import Context
from knowpress.errors import KnowpressError
from knowpress.progress import Progress
from knowpress.stage import STAGES, StageConfig

QuantMethodSpec = Annotated[
    Union[tuple(QUANT_METHODS.get(n) for n in QUANT_METHODS.names())],  # noqa: UP007
    Field(discriminator="name"),
]


@STAGES.register("quantize")
class QuantizeConfig(StageConfig):
    summary = "weight-only quantization of linear layers, stored packed"

    kind: Literal["quantize"]
    method: QuantMethodSpec  # type: ignore[valid-type]
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="name globs")

    def build(self) -> Quantize:
        return Quantize(self)


def _as_linear(module: QuantLinear) -> nn.Linear:
    """A float ``nn.Linear`` holding a packed layer's dequantized weight (for re-quantizing)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear = linear.to(device=module.weight_packed.device, dtype=module.compute_dtype)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized_weight())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def select_targets(model: nn.Module, ignore: list[str]) -> dict[str, nn.Linear]:
    """Linear layers not matched by any ignore glob.

    Layers already packed by an earlier stage are re-quantized from their dequantized
    weights (int8 -> int4 chains), never from the original float weights, which are gone.
    """
    targets: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatch(name, pattern) for pattern in ignore):
            continue
        if isinstance(module, QuantLinear):
            targets[name] = _as_linear(module)
        elif isinstance(module, nn.Linear):
            targets[name] = module
    return targets


class Quantize:
    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        targets = select_targets(ctx.model, self.config.ignore)
        if not targets:
            raise KnowpressError(
                "quantize.ignore: every linear layer is ignored; nothing to quantize "
                "(narrow the ignore globs or remove the stage)"
            )
        method = self.config.method
        for name, linear in targets.items():
            problem = method.check_module(name, linear)
            if problem:
                raise KnowpressError(f"quantize.method: {problem}")
        method.apply(ctx.model, targets, ctx, progress)
        ctx.metrics["quantized_modules"] = float(len(targets))
        fused = fused_expert_parameters(ctx.model)
        ctx.metrics["float_fused_expert_parameters"] = float(fused)
        if fused:
            # transformers 5 stores MoE experts as 3-D tensors, not nn.Linear: say so rather
            # than let the size column suggest the experts were quantized.
            progress.log(
                f"[yellow]quantize: {fused:,} parameters in fused 3-D MoE expert tensors are "
                f"left in float (this stage quantizes nn.Linear layers only)[/yellow]"
            )
        return ctx


def fused_expert_parameters(model: nn.Module) -> int:
    """Elements of 3-D parameters (fused experts, e.g. ``gate_up_proj [E, 2I, H]``)."""
    return sum(p.numel() for p in model.parameters() if p.dim() == 3)
