"""Round-to-nearest (RTN) weight-only quantization.

Each group of ``g`` consecutive input weights of a row gets its own scale (and zero point
when asymmetric) and every weight is rounded to the nearest code: ``q = round(W/s) + z``.
No calibration data. The baseline every data-aware method (GPTQ, AWQ) is compared to; see
Dettmers & Zettlemoyer, "The case for 4-bit precision" (2023) for RTN at scale.

```yaml
- kind: quantize
  method: {name: rtn, bits: 4, group_size: 32}
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import nn

from knowpress.compress.quant.base import QUANT_METHODS, QuantMethod
from knowpress.compress.quant.packing import quantize_groups
from knowpress.compress.quant.qlinear import QuantLinear

if TYPE_CHECKING:
    from knowpress.compress.quant.targets import Target
    from knowpress.models.sizes import Entry


@QUANT_METHODS.register("rtn")
class RTN(QuantMethod):
    summary = "round-to-nearest, group-wise, weight-only; packed 2/3/4/8-bit storage"
    paper = "Dettmers & Zettlemoyer 2023, arXiv:2212.09720"

    name: Literal["rtn"]
    bits: Literal[2, 3, 4, 8] = 8
    group_size: int | None = Field(
        128, gt=0, description="weights per scale; null = one scale per output row"
    )
    symmetric: bool = False

    def _group(self, in_features: int) -> int:
        return self.group_size or in_features

    def check_linear(self, name: str, out_features: int, in_features: int) -> str | None:
        g = self._group(in_features)
        if in_features % g:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            return (
                f"group_size {g} does not divide in_features {in_features} of {name}; "
                f"use one of {divisors or [in_features]} or null (per row)"
            )
        return None

    def stored_entries(self, target: Target) -> list[Entry]:
        out_features, in_features = target.shape
        group = self._group(in_features)
        return QuantLinear.entries(
            target.module, out_features, in_features, self.bits, group, self.symmetric
        )

    def quantize_linear(self, linear: nn.Linear) -> QuantLinear:
        g = self._group(linear.in_features)
        q = quantize_groups(linear.weight, self.bits, g, self.symmetric)
        return QuantLinear.from_quantized(linear, q, self.bits, g, method=self.name)
