"""Bit plans for the quantize stage (``bits_plan``): one registry, one integer program
(``base.py``), one file per plan."""

from knowpress.methods.quant.bit_plans import moe_lp, sensitivity  # noqa: F401
from knowpress.methods.quant.bit_plans.base import BIT_PLANS, BitPlan, solve, with_widths

__all__ = ["BIT_PLANS", "BitPlan", "solve", "with_widths"]
