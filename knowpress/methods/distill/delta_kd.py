"""Delta-KD: distil the teacher's fine-tuning shift, not its distribution (Cao et al. 2025,
"Delta Knowledge Distillation for Large Language Models", arXiv:2509.14526).

Target for the student, per token (logits ``[N, V]``)::

    z* = z_student_base + (z_teacher_sft − z_teacher_base),   loss = KL(softmax(z*/τ) ‖ q)

``z_teacher_sft`` is the stage's teacher, ``z_teacher_base`` the teacher before its
fine-tuning (``teacher_base``), ``z_student_base`` the student before it (``student_base``;
default the student as the stage made it, frozen at step 0). The three share one
vocabulary (the stage checks). Mixed with cross-entropy on the labels by the stage's
``sft_weight`` (λ).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from knowpress.core.specs import ModelSpec
from knowpress.methods.distill.losses import DISTILL_LOSSES, DistillLoss, forward_kl


def delta_target(student_base: torch.Tensor, teacher: torch.Tensor,
                 teacher_base: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``z_student_base + (z_teacher_sft − z_teacher_base)``: ``[..., V]`` logits."""
    return student_base + (teacher - teacher_base)


@DISTILL_LOSSES.register("delta_kd")
class DeltaKD(DistillLoss):
    summary = "student base + (teacher SFT − teacher base) logits as the target"
    paper = "Cao et al. 2025 (Delta-KD), arXiv:2509.14526"
    name: Literal["delta_kd"]
    teacher_base: ModelSpec
    student_base: ModelSpec | None = None
    extra_models: ClassVar[tuple[str, ...]] = ("teacher_base", "student_base")
    binnable: ClassVar[bool] = False

    def per_token(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if teacher_logits is None or not extra or set(extra) != set(self.extra_models):
            raise ValueError("loss 'delta_kd' needs the teacher's and both base models' logits")
        target = delta_target(extra["student_base"].float(), teacher_logits.float(),
                              extra["teacher_base"].float())  # fmt: skip
        tau = self.temperature
        s = torch.log_softmax(student_logits.float() / tau, dim=-1)
        return forward_kl(s, torch.log_softmax(target / tau, dim=-1))
