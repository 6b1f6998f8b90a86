"""Weight quantization: methods register in QUANT_METHODS; the ``quantize`` stage applies one."""

from knowpress.compress.quant import gptq, rtn  # noqa: F401  (registers them)
from knowpress.compress.quant.base import QUANT_METHODS, QuantMethod
from knowpress.compress.quant.qlinear import QuantLinear

__all__ = ["QUANT_METHODS", "QuantLinear", "QuantMethod"]
