"""Distillation: losses (``losses.py``), TAID (``taid.py``), Delta-KD (``delta_kd.py``),
students, data and the trainer."""

from knowpress.methods.distill import delta_kd, taid  # noqa: F401  (register "delta_kd", "taid")
from knowpress.methods.distill.losses import DISTILL_LOSSES, DistillLoss

__all__ = ["DISTILL_LOSSES", "DistillLoss"]
