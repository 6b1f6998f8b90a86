"""One optimizer step's loss: micro-batches of a batch against the teacher's outputs.

Every micro-batch loss is divided by the token count of the whole batch (over all processes
when data-parallel), so the accumulated gradient equals one big batch's. Logits at position
``i`` predict token ``i+1``; the loss counts the positions whose next token is labelled. The
teacher's outputs come live (one, or one per sampled MoE routing, averaged) or from the
offline cache's bins (``logit_cache.py``) for dataset batches; ``sft_weight`` mixes in CE.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from knowpress.core.errors import KnowpressError
from knowpress.methods.distill.batches import Batch
from knowpress.methods.distill.fsdp import is_sharded
from knowpress.methods.distill.logit_cache import TeacherCache
from knowpress.methods.distill.losses import DistillLoss
from knowpress.methods.distill.moe_teacher import MoETeacherSpec, sampled_routing

if TYPE_CHECKING:
    from knowpress.methods.distill.trainer import TrainSpec


def _chunks(n: int, parts: int) -> Iterator[slice]:
    size = math.ceil(n / parts)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass
class Extras:
    """What a step needs beyond student, teacher and loss: the loss's frozen base models
    (Delta-KD) and the MoE-teacher options (``moe_teacher.py``) with the step's seed."""

    models: dict[str, PreTrainedModel] | None = None
    moe: MoETeacherSpec | None = None
    seed: int = 0
    cache: TeacherCache | None = None  # dataset batches only
    step: int = 0
    total: torch.Tensor | None = None  # counted tokens of the whole batch over all processes
    rows: list[int] | None = None  # this process's rows' indices in the batch (the cache's)


def _teacher_logits(teacher: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor,
                    extras: Extras) -> list[torch.Tensor]:  # fmt: skip
    """``[B, T-1, V]`` teacher logits: one, or one per sampled routing (knowledge
    augmentation); with gradients into the routers only when they are trained."""
    moe = extras.moe
    train_router = moe is not None and moe.router_lr > 0
    with torch.set_grad_enabled(train_router):
        if moe is None or moe.augment == 1:
            return [teacher(input_ids=ids, attention_mask=attention).logits[:, :-1]]
        outs = []
        for k in range(moe.augment):
            with sampled_routing(teacher, seed=extras.seed * 64 + k):
                outs.append(teacher(input_ids=ids, attention_mask=attention).logits[:, :-1])
        return outs


def batch_loss(student: PreTrainedModel, teacher: PreTrainedModel | None, loss: DistillLoss,
               batch: Batch, spec: TrainSpec, sft_weight: float, interp: float | None,
               extras: Extras | None = None) -> torch.Tensor:  # fmt: skip
    """Backward through every micro-batch; returns the batch loss (detached). With several
    teacher outputs (sampled routings) the KD term is their mean."""
    extras = extras or Extras()
    ids, attention, labels = batch
    counted = labels[:, 1:] != -100
    total = extras.total if extras.total is not None else counted.sum().clamp_min(1)
    value = torch.zeros((), device=ids.device)
    if ids.shape[0] == 0:  # fewer rows than processes: this one only joins the sums
        return value
    bins = _cached_bins(teacher, batch, spec, extras) if extras.cache is not None else None
    for part in _chunks(ids.shape[0], spec.grad_accum):
        with _autocast(ids.device, spec):
            if bins is not None:
                logits = student(input_ids=ids[part], attention_mask=attention[part]).logits
                kd = loss.binned(logits[:, :-1], bins[0][part], bins[1][part], counted[part],
                                 total)  # fmt: skip
                kd = kd + _sft(logits[:, :-1], labels[part, 1:], total, sft_weight, kd)
            else:
                kd = _micro_loss(student, teacher, loss,
                                 (ids[part], attention[part], labels[part]), counted[part],
                                 total, sft_weight, interp, extras)  # fmt: skip
        kd.backward()
        value += kd.detach()
    return value


def _cached_bins(teacher: PreTrainedModel | None, batch: Batch, spec: TrainSpec,
                 extras: Extras) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The teacher's top-k bins ``[B, T-1, k]`` / ``[B, T-1, k+1]`` for a dataset batch:
    from the cache when its files match the rows, else computed and stored. A sharded
    teacher runs in every process or in none (its forwards are collective)."""
    cache, (ids, attention, _) = extras.cache, batch
    assert cache is not None
    rows = extras.rows if extras.rows is not None else list(range(ids.shape[0]))
    hit = cache.get(extras.step, rows, ids)
    if teacher is None:  # teacher_cache.read_only
        if hit is None:
            raise KnowpressError(
                f"teacher_cache.read_only: step {extras.step + 1} (rows {rows[0]}..{rows[-1]}) "
                f"is not in {cache.folder} for this data, top_k and temperature; write the "
                "cache with a run without read_only first"
            )
        return hit
    if is_sharded(teacher):
        import torch.distributed as dist

        missed = torch.tensor([int(hit is None)], device=ids.device)
        dist.all_reduce(missed)
        if not missed.item():
            return hit  # type: ignore[return-value]
    elif hit is not None:
        return hit
    with torch.no_grad():
        logits = torch.cat([teacher(input_ids=ids[p], attention_mask=attention[p]).logits[:, :-1]
                            for p in _chunks(ids.shape[0], spec.grad_accum)])  # fmt: skip
    return hit if hit is not None else cache.put(extras.step, rows, ids, logits)


def _sft(logits: torch.Tensor, target: torch.Tensor, total: torch.Tensor, weight: float,
         kd: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The change to ``kd`` that mixes in CE by ``weight``: ``w·(CE − KD)``."""
    if not weight:
        return torch.zeros((), device=logits.device)
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                           ignore_index=-100, reduction="sum") / total  # fmt: skip
    return weight * (ce - kd)


def _autocast(device: torch.device, spec: TrainSpec) -> Any:
    """bf16 autocast on cuda (losses upcast their logits to float32 themselves)."""
    enabled = device.type == "cuda" and spec.bf16_autocast
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _micro_loss(student: PreTrainedModel, teacher: PreTrainedModel | None, loss: DistillLoss,
                batch: Batch, counted: torch.Tensor, total: torch.Tensor, sft_weight: float,
                interp: float | None, extras: Extras) -> torch.Tensor:  # fmt: skip
    ids, attention, labels = batch
    logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1]
    target = labels[:, 1:]
    extra = None
    if extras.models:
        with torch.no_grad():
            extra = {name: model(input_ids=ids, attention_mask=attention).logits[:, :-1]
                     for name, model in extras.models.items()}  # fmt: skip
    teachers: list[torch.Tensor | None] = [None]
    if loss.needs_teacher:
        assert teacher is not None
        teachers = list(_teacher_logits(teacher, ids, attention, extras))
    kd = sum(loss(logits, t, counted, target, total, interp, extra) for t in teachers)
    kd = kd / len(teachers)
    if sft_weight:
        ce = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
            reduction="sum") / total  # fmt: skip
        kd = (1 - sft_weight) * kd + sft_weight * ce
    return kd
