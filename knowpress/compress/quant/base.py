"""The quantization-method family: a registry of method configs.

A method's config is a frozen pydantic model discriminated by ``name``; its hyperparameters
are its fields. ``quantize_linear`` turns one ``nn.Linear`` into a packed ``QuantLinear``;
methods that need calibration data (GPTQ) override ``apply`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from knowpress.config import FrozenConfig
from knowpress.registry import Registry

if TYPE_CHECKING:
    from knowpress.compress.quant.qlinear import QuantLinear
    from knowpress.context import Context
    from knowpress.progress import Progress


class QuantMethod(FrozenConfig):
    name: str

    def check_module(self, name: str, linear: nn.Linear) -> str | None:
        """A reason this method cannot quantize ``linear`` (shape constraints), or None."""
        return None

    def quantize_linear(self, linear: nn.Linear) -> QuantLinear:
        raise NotImplementedError

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Linear],
        ctx: Context,
        progress: Progress,
    ) -> None:
        """Replace each target module in ``model`` by its quantized version."""
        for name in progress.track(list(targets), f"{self.name}: quantizing"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, self.quantize_linear(targets[name]))


QUANT_METHODS: Registry[type[QuantMethod]] = Registry("quant method")
