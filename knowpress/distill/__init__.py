"""Distillation: losses (``losses.py``), TAID (``taid.py``)."""

from knowpress.distill import taid  # noqa: F401  (registers "taid")
from knowpress.distill.losses import DISTILL_LOSSES, DistillLoss

__all__ = ["DISTILL_LOSSES", "DistillLoss"]
