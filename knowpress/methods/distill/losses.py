"""Distillation losses: divergences between teacher ``p`` and student ``q`` per token.

Every divergence is a pure function of log-probabilities ``[..., V] -> [...]``; the loss
configs (one registry, ``DISTILL_LOSSES``, discriminated by ``name``) apply the temperature
``τ`` to both sides' logits (``log_softmax(z / τ)``; no ``τ²`` factor, as TRL), pick the
masked tokens and reduce them as ``Σ_tokens loss / normalizer``. The normalizer defaults to
the number of masked tokens; the trainer passes the token count of the whole accumulated
batch, so gradient accumulation sums to the same mean as one big batch.

- forward KL ``Σ p log(p/q)``; reverse KL ``Σ q log(q/p)``.
- generalized JSD(β), mixture ``m = β p + (1−β) q`` (TRL's and GKD's convention, Agarwal et
  al. 2024, arXiv:2306.13649): ``β KL(p‖m) + (1−β) KL(q‖m)``; β=0 is taken as forward KL and
  β=1 as reverse KL (the limits of JSD(β)/β and JSD(β)/(1−β)), not as the 0 the formula gives.
- skew KL ``KL(p ‖ α p + (1−α) q)`` and skew reverse KL ``KL(q ‖ α q + (1−α) p)``
  (DistiLLM, Ko et al. 2024, arXiv:2402.03898).
- TVD ``½ Σ |p − q|``.
- adaptive KL (AKL, Wu et al. 2024, arXiv:2404.02657): the head is the teacher's most
  likely tokens up to cumulative mass ``μ``; ``g = Σ_head |p−q| / Σ |p−q|`` (no gradient);
  ``AKL = g · FKL + (1−g) · RKL``.
- ``ce``: cross-entropy on the labels (no teacher).

Check vector (DESIGN.md): p=[0.7, 0.2, 0.1], q=[0.2, 0.5, 0.3] → FKL 0.5838, RKL 0.5372,
TVD 0.5, skew KL(α=0.1) 0.4469.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from knowpress.core.config import FrozenConfig
from knowpress.core.registry import Registry


def kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """``KL(a ‖ b) = Σ a (log a − log b)`` over the last axis, from log-probs; ``a = 0``
    terms are 0 (the clamp keeps ``0 · −inf`` out of the value and its gradient)."""
    safe_a = logp_a.clamp_min(torch.finfo(logp_a.dtype).min)
    return (logp_a.exp() * (safe_a - logp_b)).sum(-1)


def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return kl(t, s)


def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return kl(s, t)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w a + (1−w) b)``, stable in log space."""
    if weight_a in (0, 1):
        return logp_a if weight_a == 1 else logp_b
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0:
        return forward_kl(s, t)
    if beta == 1:
        return reverse_kl(s, t)
    m = _mix(t, s, beta)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def skew_kl(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    return kl(t, _mix(t, s, alpha))


def skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    return kl(s, _mix(s, t, alpha))


def tvd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def adaptive_kl(s: torch.Tensor, t: torch.Tensor, mu: float) -> torch.Tensor:
    p, q = t.exp(), s.exp()
    order = p.argsort(dim=-1, descending=True)
    sorted_p = p.gather(-1, order)
    # a token is in the head while the mass before it is below μ (the top token always is)
    head_sorted = (sorted_p.cumsum(-1) - sorted_p) < mu
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    gap = (p - q).abs().detach()
    total = gap.sum(-1).clamp_min(torch.finfo(gap.dtype).tiny)
    g = (gap * head).sum(-1) / total
    return g * forward_kl(s, t) + (1 - g) * reverse_kl(s, t)


class DistillLoss(FrozenConfig):
    """A loss on ``[B, T, V]`` logits and a ``[B, T]`` mask of the tokens it counts."""

    name: str
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    needs_teacher: ClassVar[bool] = True
    stateful: ClassVar[bool] = False  # carries a schedule (TAID) the trainer advances
    #: frozen models besides the teacher whose logits the loss needs (Delta-KD)
    extra_models: ClassVar[tuple[str, ...]] = ()
    #: a divergence of two distributions, so it can run on the teacher-logit cache's bins
    binnable: ClassVar[bool] = True

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-token loss from student and teacher log-probs ``[N, V] -> [N]``."""
        raise NotImplementedError

    def per_token(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[N, V]`` logits (and ``[N]`` labels) of the counted tokens -> ``[N]``."""
        if teacher_logits is None:
            raise ValueError(f"loss {self.name!r} needs teacher logits")
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"loss {self.name!r}: teacher vocabulary {teacher_logits.shape[-1]} != "
                f"student vocabulary {student_logits.shape[-1]}"
            )
        s = torch.log_softmax(student_logits.float() / self.temperature, dim=-1)
        t = torch.log_softmax(teacher_logits.float() / self.temperature, dim=-1)
        return self.divergence(s, t)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        interp: float | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``Σ_{mask} per_token / normalizer`` (default: the number of masked tokens);
        ``interp``: a stateful loss's schedule value (TAID's t); ``extra``: logits of the
        loss's ``extra_models`` (Delta-KD's base models), ``[B, T, V]`` each."""
        mask = mask.bool()
        picked_t = None if teacher_logits is None else teacher_logits[mask]
        picked_l = None if labels is None else labels[mask]
        picked = (student_logits[mask], picked_t, picked_l)
        kwargs: dict[str, Any] = {} if interp is None else {"interp": interp}
        if extra:
            kwargs["extra"] = {name: logits[mask] for name, logits in extra.items()}
        losses = self.per_token(*picked, **kwargs)
        count = normalizer if normalizer is not None else mask.sum().clamp_min(1)
        return losses.sum() / count

    def binned(self, student_logits: torch.Tensor, indices: torch.Tensor,
               teacher_logprobs: torch.Tensor, mask: torch.Tensor,
               normalizer: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The loss over the teacher-logit cache's ``k+1`` bins (``logit_cache.py``)."""
        from knowpress.methods.distill.logit_cache import bin_student

        mask = mask.bool()
        s = bin_student(student_logits[mask], indices[mask], self.temperature)
        return self.divergence(s, teacher_logprobs[mask]).sum() / normalizer


DISTILL_LOSSES: Registry[type[DistillLoss]] = Registry("distill loss")


@DISTILL_LOSSES.register("forward_kl")
class ForwardKL(DistillLoss):
    summary = "forward KL(p ‖ q): mode-covering, the classic KD objective"
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    name: Literal["forward_kl"]

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return forward_kl(s, t)


@DISTILL_LOSSES.register("reverse_kl")
class ReverseKL(DistillLoss):
    summary = "reverse KL(q ‖ p): mode-seeking"
    paper = "Gu et al. 2024 (MiniLLM), arXiv:2306.08543"
    name: Literal["reverse_kl"]

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return reverse_kl(s, t)


@DISTILL_LOSSES.register("gjsd")
class GeneralizedJSD(DistillLoss):
    summary = "generalized JSD(β), m = βp + (1−β)q; β=0 forward KL, β=1 reverse KL"
    paper = "Agarwal et al. 2024 (GKD), arXiv:2306.13649"
    name: Literal["gjsd"]
    beta: float = Field(0.5, ge=0, le=1)

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(s, t, self.beta)


@DISTILL_LOSSES.register("skew_kl")
class SkewKL(DistillLoss):
    summary = "skew KL(p ‖ αp + (1−α)q)"
    paper = "Ko et al. 2024 (DistiLLM), arXiv:2402.03898"
    name: Literal["skew_kl"]
    alpha: float = Field(0.1, ge=0, le=1)

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return skew_kl(s, t, self.alpha)


@DISTILL_LOSSES.register("skew_reverse_kl")
class SkewReverseKL(DistillLoss):
    summary = "skew reverse KL(q ‖ αq + (1−α)p)"
    paper = "Ko et al. 2024 (DistiLLM), arXiv:2402.03898"
    name: Literal["skew_reverse_kl"]
    alpha: float = Field(0.1, ge=0, le=1)

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return skew_reverse_kl(s, t, self.alpha)


@DISTILL_LOSSES.register("tvd")
class TVD(DistillLoss):
    summary = "total variation distance ½Σ|p − q|"
    paper = "Wen et al. 2023 (f-divergence KD), arXiv:2307.15190"
    name: Literal["tvd"]

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tvd(s, t)


@DISTILL_LOSSES.register("akl")
class AdaptiveKL(DistillLoss):
    summary = "adaptive KL: head/tail gap-weighted mix of forward and reverse KL"
    paper = "Wu et al. 2024, arXiv:2404.02657"
    name: Literal["akl"]
    mu: float = Field(0.5, gt=0, le=1)

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return adaptive_kl(s, t, self.mu)


@DISTILL_LOSSES.register("ce")
class CrossEntropy(DistillLoss):
    summary = "cross-entropy on the labels (SFT; no teacher)"
    paper = ""
    name: Literal["ce"]
    needs_teacher: ClassVar[bool] = False
    binnable: ClassVar[bool] = False

    def per_token(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("loss 'ce' needs labels")
        logits = student_logits.float() / self.temperature
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
