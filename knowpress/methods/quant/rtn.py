"""Round-to-nearest (RTN) weight-only quantization.

Each group of ``g`` consecutive input weights of a row gets its own scale (and zero point
when asymmetric) and every weight is rounded to the nearest code: ``q = round(W/s) + z``.
No calibration data. ``dtype`` picks the grid (int, fp8, nvfp4, mxfp4: ``tensors/grids.py``).
The baseline every data-aware method (GPTQ, AWQ) is compared to; see
Dettmers & Zettlemoyer, "The case for 4-bit precision" (2023) for RTN at scale.

```yaml
- kind: quantize
  method: {name: rtn, bits: 4, group_size: 32}
  # method: {name: rtn, dtype: nvfp4}     # e2m1 codes, groups of 16, fp8 scales
```
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from knowpress.methods.quant.base import QUANT_METHODS, GroupWise
from knowpress.tensors.qlinear import QuantLinear


@QUANT_METHODS.register("rtn")
class RTN(GroupWise):
    summary = "round-to-nearest, group-wise, weight-only; packed 2/3/4/8-bit storage"
    paper = "Dettmers & Zettlemoyer 2023, arXiv:2212.09720"

    name: Literal["rtn"]
    bits: Literal[2, 3, 4, 8] = 8

    def quantize_linear(self, linear: nn.Linear) -> QuantLinear:
        g = self.group(linear.in_features)
        q = self.quantize_weight(linear.weight)
        return QuantLinear.from_quantized(linear, q, self.bits, g, self.name, self.dtype)
