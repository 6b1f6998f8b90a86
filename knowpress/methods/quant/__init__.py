"""Weight quantization: methods register in QUANT_METHODS; the ``quantize`` stage applies one."""

from knowpress.methods.quant import gptq, rtn  # noqa: F401  (registers them)
from knowpress.methods.quant.base import QUANT_METHODS, QuantMethod
from knowpress.tensors.qlinear import QuantLinear

__all__ = ["QUANT_METHODS", "QuantLinear", "QuantMethod"]
