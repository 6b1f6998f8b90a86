"""The distill training loop: student against a frozen teacher, resumable, guarded.

One optimizer step: the batch (``data.py``), or with probability ``on_policy.rate`` (seeded
per step) a batch the student generates from the step's prompts (on-policy GKD, Agarwal et
al. 2024, arXiv:2306.13649; ``source: teacher`` is sequence-level KD: the teacher generates).
The step's loss over ``grad_accum`` micro-batches is ``step.py``'s; the step loss is
``(1 − sft_weight) · KD + sft_weight · CE`` (CE on dataset batches only). Inside a
torch.distributed group each process takes rows ``rank::world``, gradients are summed
(``parallel.py``); the student starts from rank 0's weights. Under FSDP2 (``fsdp.py``) the
student (and a teacher whose routers do not train) is sharded here, FSDP sums its gradients,
and checkpoints are gathered on rank 0 in the same file layout.

AdamW, linear warmup then cosine to ``min_lr_ratio``, gradient norm clipped. Every
``checkpoint_every`` steps the student, AdamW's moments, the step and the loss schedule
(TAID's t) go to ``checkpoint`` (``core/train_state.py``); a stage started again with the
same hash continues from there. A non-finite loss stops training before the optimizer
applies it: the error names the step and the last good checkpoint, which is kept.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.core.train_state import TrainState, load_state, save_state
from knowpress.methods.distill import fsdp
from knowpress.methods.distill.batches import Batch, BatchSource, left_pad
from knowpress.methods.distill.logit_cache import TeacherCache, TeacherCacheSpec
from knowpress.methods.distill.losses import DistillLoss
from knowpress.methods.distill.moe_teacher import (
    MoETeacherSpec,
    router_parameters,
    routers,
)
from knowpress.methods.distill.parallel import (
    all_reduce_grads,
    broadcast_parameters,
    distributed,
    shard,
)
from knowpress.methods.distill.step import Extras, batch_loss


class OnPolicySpec(FrozenConfig):
    rate: float = Field(0.5, ge=0, le=1, description="λ: share of steps on generated batches")
    source: Literal["student", "teacher"] = Field("student", description="teacher: seq-KD")
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)


class TrainSpec(FrozenConfig):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    warmup: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seq_len: int = Field(128, ge=8)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable saves")
    bf16_autocast: bool = Field(True, description="on cuda: forward passes in bf16 autocast")


@dataclass
class Outcome:
    steps: int
    resumed_from: int
    loss: float
    on_policy_steps: int
    train_seconds: float
    generate_seconds: float
    schedule: dict[str, float]
    cache: dict[str, int]


def lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine)


def is_on_policy(seed: int, step: int, rate: float) -> bool:
    """Whether ``step`` trains on a generated batch: a pure function of (seed, step)."""
    return rate > 0 and random.Random(f"knowpress-gkd:{seed}:{step}").random() < rate


@torch.no_grad()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], spec: OnPolicySpec,
                   pad_id: int, eos_id: int, seed: int) -> Batch:  # fmt: skip
    """Sample continuations (batched, KV cache); labels: the generated tokens up to and
    including the first ``</s>``, -100 elsewhere."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=spec.temperature, top_k=0, top_p=1.0,
                             max_new_tokens=spec.max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=eos_id, use_cache=True)  # fmt: skip
    model.train(was_training)
    new = out[:, ids.shape[1] :]
    ended = (new == eos_id).long().cumsum(-1)
    keep = (ended == 0) | ((ended == 1) & (new == eos_id))  # up to the first </s>
    labels = torch.full_like(out, -100)
    labels[:, ids.shape[1] :] = torch.where(keep, new, torch.full_like(new, -100))
    attention = torch.cat([mask, keep.long()], dim=1)
    return out, attention, labels


class _RouterSet(torch.nn.Module):
    """The teacher's routers as one module, for their checkpoint (student-aware router)."""

    def __init__(self, teacher: PreTrainedModel) -> None:
        super().__init__()
        self.routers = torch.nn.ModuleList(routers(teacher))


def _optimizer(model: PreTrainedModel, spec: TrainSpec) -> torch.optim.AdamW:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.98))


class Trainer:
    """``run()`` trains ``student`` in place and returns the ``Outcome``."""

    def __init__(self, student: PreTrainedModel, teacher: PreTrainedModel | None,
                 loss: DistillLoss, data: BatchSource, spec: TrainSpec,
                 on_policy: OnPolicySpec | None, sft_weight: float,
                 checkpoint: Path | None, key: str,
                 extra_models: dict[str, PreTrainedModel] | None = None,
                 moe: MoETeacherSpec | None = None,
                 cache: TeacherCacheSpec | None = None) -> None:  # fmt: skip
        self.student, self.teacher, self.loss, self.data = student, teacher, loss, data
        self.extra_models, self.moe = extra_models or {}, moe
        self.cache = TeacherCache(cache, loss.temperature) if cache is not None else None
        self.router_optimizer = None
        if moe is not None and moe.router_lr > 0 and teacher is not None:
            params = router_parameters(teacher)
            for p in params:
                p.requires_grad_(True)
            self.router_optimizer = torch.optim.AdamW(params, lr=moe.router_lr, weight_decay=0)
        self.spec, self.on_policy, self.sft_weight = spec, on_policy, sft_weight
        self.checkpoint, self.key = checkpoint, key
        self.sharded = fsdp.active()
        if self.sharded:  # the same start everywhere, then each process keeps its shard
            broadcast_parameters(student)
            fsdp.shard(student)
            if teacher is not None and self.router_optimizer is None:
                fsdp.shard(teacher)
        self.optimizer = _optimizer(student, spec)
        make = getattr(loss, "schedule", None)
        self.schedule = make(spec.steps) if callable(make) else None
        self.generate_seconds, self.on_policy_steps = 0.0, 0

    def _resume(self) -> TrainState:
        state = None
        if self.checkpoint is not None:
            load = fsdp.load_checkpoint if self.sharded else load_state
            state = load(self.checkpoint, self.student, self.optimizer, self.key)
        if state is None:
            return TrainState()
        if self.schedule is not None and "schedule" in state.extra:
            self.schedule.load_state_dict(state.extra["schedule"])  # type: ignore[arg-type]
        if self.router_optimizer is not None and self.teacher is not None:
            routed = load_state(self._router_file(), _RouterSet(self.teacher),
                                self.router_optimizer, self.key)  # fmt: skip
            if routed is None or routed.step != state.step:
                return TrainState()  # the routers' save does not match: start over
        self.generate_seconds = float(state.extra.get("generate_seconds", 0.0))
        self.on_policy_steps = int(state.extra.get("on_policy_steps", 0))
        return state

    def _save(self, state: TrainState) -> None:
        if self.checkpoint is None or (distributed()[0] != 0 and not self.sharded):
            return  # one writer: rank 0 (under FSDP every rank gathers, rank 0 writes)
        state.extra = {"generate_seconds": self.generate_seconds,
                       "on_policy_steps": self.on_policy_steps}  # fmt: skip
        if self.schedule is not None:
            state.extra["schedule"] = self.schedule.state_dict()  # type: ignore[assignment]
        if self.sharded:
            fsdp.save_checkpoint(self.checkpoint, self.student, self.optimizer, state, self.key)
            if distributed()[0] != 0:
                return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if self.router_optimizer is not None and self.teacher is not None:
            save_state(self._router_file(), _RouterSet(self.teacher), self.router_optimizer,
                       state, self.key)  # fmt: skip
        if not self.sharded:
            save_state(self.checkpoint, self.student, self.optimizer, state, self.key)

    def _router_file(self) -> Path:
        assert self.checkpoint is not None
        return self.checkpoint.with_name("router_state.safetensors")

    def _batch(self, step: int) -> tuple[Batch, bool]:
        op, data = self.on_policy, self.data
        if op is None or not is_on_policy(self.spec.seed, step, op.rate):
            return data.batch(step), False
        model = self.student if op.source == "student" else self.teacher
        assert model is not None
        start = time.perf_counter()
        tok = data.tokenizer
        batch = generate_batch(model, data.prompts(step), op, tok.pad_token_id, tok.eos_token_id,
                               seed=hash((self.spec.seed, step)) % 2**31)  # fmt: skip
        self.generate_seconds += time.perf_counter() - start
        self.on_policy_steps += 1
        return batch, True

    def run(self, progress: Progress) -> Outcome:
        spec, device = self.spec, next(self.student.parameters()).device
        whole = [] if self.sharded else [self.student]  # a sharded student was broadcast
        for model in [*whole, *self.extra_models.values()]:  # same start on every rank
            broadcast_parameters(model)
        state = self._resume()
        start_step, begun = state.step, time.perf_counter()
        self.student.train()
        last_good = start_step
        for step in progress.track(range(start_step, spec.steps), "distill",
                                   completed=start_step, total=spec.steps):  # fmt: skip
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, spec)
            batch, generated = self._batch(step)
            batch = tuple(t.to(device) for t in batch)  # type: ignore[assignment]
            interp = self.schedule.t if self.schedule is not None else None
            sft = 0.0 if generated else self.sft_weight
            extras = Extras(self.extra_models, self.moe, seed=spec.seed * 1_000_003 + step,
                            cache=None if generated else self.cache, step=step)  # fmt: skip
            batch, extras.total, extras.rows = shard(batch, even=self.sharded)
            loss_value = batch_loss(self.student, self.teacher, self.loss, batch, spec, sft,
                                    interp, extras)  # fmt: skip
            routed = self.router_optimizer is not None and self.teacher is not None
            trained = [*whole, *([_RouterSet(self.teacher)] if routed else [])]  # type: ignore[arg-type]
            value = float(all_reduce_grads(trained, loss_value))
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                if self.router_optimizer is not None:
                    self.router_optimizer.zero_grad(set_to_none=True)
                where = f"step {last_good} in {self.checkpoint}" if self.checkpoint else "none"
                raise KnowpressError(
                    f"distill: the loss became {value} at step {step + 1} (nothing applied; "
                    f"last good checkpoint: {where}); lower train.lr or check the data"
                )
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), spec.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.router_optimizer is not None:
                self.router_optimizer.step()
                self.router_optimizer.zero_grad(set_to_none=True)
            if self.schedule is not None:
                self.schedule.update(value)
            state.ema = value if state.ema is None else 0.9 * state.ema + 0.1 * value
            state.step = step + 1
            shown = f" t {self.schedule.t:.3f}" if self.schedule is not None else ""
            progress.note(f"loss {state.ema:.3f}{shown}")
            if state.step % spec.checkpoint_every == 0 and state.step < spec.steps:
                self._save(state)
                last_good = state.step
        self.student.eval()
        cache = {} if self.cache is None else {"hits": self.cache.hits,
                                                 "misses": self.cache.misses}  # fmt: skip
        return Outcome(
            steps=spec.steps, resumed_from=start_step, loss=float(state.ema or 0.0),
            on_policy_steps=self.on_policy_steps,
            train_seconds=round(time.perf_counter() - begun, 3),
            generate_seconds=round(self.generate_seconds, 3),
            schedule=self.schedule.state_dict() if self.schedule is not None else {},
            cache=cache,
        )  # fmt: skip
