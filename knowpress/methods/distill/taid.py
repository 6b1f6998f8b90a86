"""TAID: temporally adaptive interpolated distillation (Shing et al. 2025, arXiv:2501.16937).

The target moves from the student towards the teacher in logit space:

    p_t = softmax((1 − t) · stopgrad(z_s) + t · z_T),   loss = −Σ p_t log q   (q = softmax(z_s))

(only the student side of the target is detached). ``t`` grows from ``t_start`` to
``t_end``: after each training step with loss ``J``,

    δ = (J_prev − J) / (J_prev + ε),   m ← β m + (1 − β) δ,
    t ← min(t_end, max(t_linear(step), t + α · sigmoid(m) · (1 − t)))

with ``t_linear`` the straight line from ``t_start`` at step 0 to ``t_end`` at the last step.
Fast progress (large m) moves t faster; the line is the floor. The schedule state (t, m,
J_prev) is part of the trainer's checkpoint; across processes the loss it sees is the mean
of every process's (``update(loss, reduce=...)``), so all processes hold the same t. Only
``update`` advances it, and only the trainer calls that: evaluation never does.

Check (DESIGN.md): z_s=[1,0,0], z_T=[0,2,0], t=0.4 → p_t ≈ [0.3610, 0.4409, 0.1981],
loss ≈ 1.1905.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from knowpress.methods.distill.losses import DISTILL_LOSSES, DistillLoss

EPS = 1e-8


def taid_target(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float
) -> torch.Tensor:
    """``softmax((1−t)·stopgrad(z_s) + t·z_T)`` over the last axis: ``[..., V]``."""
    return torch.softmax((1 - t) * student_logits.detach() + t * teacher_logits, dim=-1)


def taid_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Per-token cross-entropy of the student against the interpolated target: ``[...]``."""
    target = taid_target(student_logits, teacher_logits, t)
    return -(target * torch.log_softmax(student_logits, dim=-1)).sum(-1)


class TAIDSchedule:
    """The adaptive ``t``: ``update`` after every optimizer step, ``state_dict`` /
    ``load_state_dict`` through the checkpoint."""

    def __init__(self, t_start: float, t_end: float, alpha: float, beta: float,
                 total_steps: int) -> None:  # fmt: skip
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.total_steps = max(1, total_steps)
        self.t, self.momentum, self.previous, self.step = t_start, 0.0, math.nan, 0

    def linear(self, step: int) -> float:
        frac = min(1.0, step / self.total_steps)
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, loss: float, reduce: Callable[[float], float] | None = None) -> float:
        """Advance by one step on this step's loss (``reduce``: the mean over processes)."""
        loss = reduce(loss) if reduce is not None else loss
        self.step += 1
        if not math.isnan(self.previous):
            delta = (self.previous - loss) / (self.previous + EPS)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * delta
        self.previous = loss
        adaptive = self.t + self.alpha * _sigmoid(self.momentum) * (1 - self.t)
        self.t = min(self.t_end, max(self.linear(self.step), adaptive))
        return self.t

    def state_dict(self) -> dict[str, float]:
        return {"t": self.t, "momentum": self.momentum, "previous": self.previous,
                "step": self.step}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.momentum = float(state["t"]), float(state["momentum"])
        self.previous, self.step = float(state["previous"]), int(state["step"])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@DISTILL_LOSSES.register("taid")
class TAID(DistillLoss):
    summary = "interpolated target (1−t)·z_s + t·z_T with an adaptive t schedule"
    paper = "Shing et al. 2025, arXiv:2501.16937"
    name: Literal["taid"]
    t_start: float = Field(0.4, ge=0, le=1)
    t_end: float = Field(1.0, ge=0, le=1)
    alpha: float = Field(5e-4, ge=0)
    beta: float = Field(0.99, ge=0, lt=1)
    stateful: ClassVar[bool] = True
    binnable: ClassVar[bool] = False

    @model_validator(mode="after")
    def _ordered(self) -> TAID:
        if self.t_start > self.t_end:
            raise ValueError(f"t_start {self.t_start} is above t_end {self.t_end}")
        return self

    def schedule(self, total_steps: int) -> TAIDSchedule:
        return TAIDSchedule(self.t_start, self.t_end, self.alpha, self.beta, total_steps)

    def per_token(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        interp: float | None = None,
    ) -> torch.Tensor:
        if teacher_logits is None or interp is None:
            raise ValueError("loss 'taid' needs teacher logits and the schedule's t (interp)")
        tau = self.temperature
        return taid_loss(student_logits.float() / tau, teacher_logits.float() / tau, interp)
