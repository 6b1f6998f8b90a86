"""MoE teachers: sampled routing (knowledge augmentation) and the student-aware router."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import knowpress.methods.distill.step as step_module
import knowpress.methods.distill.trainer as trainer_module
from knowpress.core.progress import Progress
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.moe_teacher import (
    MoETeacherSpec,
    check_moe_teacher,
    routers,
    sampled_routing,
)
from knowpress.methods.distill.trainer import Trainer, TrainSpec
from knowpress.pipeline.distill_data import DistillData
from knowpress.testing.models import tiny_llama, tiny_mixtral, tiny_tokenizer

IDS = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(0))
TEXTS = [" ".join(f"w{(i * 7 + j) % 60}" for j in range(16)) for i in range(48)]


def test_sampling_changes_the_routing_and_peaked_routers_sample_their_top_k() -> None:
    teacher = tiny_mixtral(layers=2).eval()
    with torch.no_grad():
        top_k = teacher(IDS).logits
        with sampled_routing(teacher, seed=0):
            sampled = teacher(IDS).logits
        with sampled_routing(teacher, seed=0):
            again = teacher(IDS).logits
        assert not torch.allclose(sampled, top_k) and torch.equal(sampled, again)
        assert torch.equal(teacher(IDS).logits, top_k)  # hooks removed on exit
        for router in routers(teacher):  # all mass on the top-k: sampling = top-k
            router.weight.mul_(1e4)
        peaked = teacher(IDS).logits
        with sampled_routing(teacher, seed=3):
            assert torch.allclose(teacher(IDS).logits, peaked, atol=1e-5)


def _trainer(teacher: Any, tmp: Path | None, moe: MoETeacherSpec, **spec: Any) -> Trainer:
    tokenizer = tiny_tokenizer(64)
    data = DistillData(None, tokenizer, TEXTS, 8, 16, seed=0)
    student = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=32)
    loss = DISTILL_LOSSES.get("forward_kl").model_validate({"name": "forward_kl"})
    train = TrainSpec(**{"steps": 4, "batch_size": 8, "warmup": 1, **spec})
    checkpoint = tmp / "state.safetensors" if tmp else None
    return Trainer(student, teacher, loss, data, train, None, 0.0, checkpoint, "k", None, moe)


def test_augmented_loss_is_the_mean_over_the_sampled_routings(monkeypatch: Any) -> None:
    teacher = tiny_mixtral(layers=1).eval().requires_grad_(False)
    calls: list[int] = []
    real = step_module._teacher_logits

    def spy(*args: Any) -> list[torch.Tensor]:
        out = real(*args)
        calls.append(len(out))
        return out

    monkeypatch.setattr(step_module, "_teacher_logits", spy)
    _trainer(teacher, None, MoETeacherSpec(augment=3), steps=2).run(Progress(enabled=False))
    assert calls == [3, 3]


def test_the_student_aware_router_trains_only_the_routers_and_resumes(
    tmp_path: Path, monkeypatch: Any
) -> None:
    moe = MoETeacherSpec(router_lr=1e-2)
    teacher = tiny_mixtral(layers=1).eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    whole = _trainer(teacher, None, moe)
    whole.run(Progress(enabled=False))
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".gate." in k for k in changed)  # routers only
    killed = copy.deepcopy(tiny_mixtral(layers=1).eval().requires_grad_(False))
    calls = {"n": 0}
    real = trainer_module.batch_loss

    def kill(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "batch_loss", kill)
    with pytest.raises(KeyboardInterrupt):
        _trainer(killed, tmp_path, moe, checkpoint_every=2).run(Progress(enabled=False))
    monkeypatch.setattr(trainer_module, "batch_loss", real)
    fresh = tiny_mixtral(layers=1).eval().requires_grad_(False)
    resumed = _trainer(fresh, tmp_path, moe, checkpoint_every=2)
    assert resumed.run(Progress(enabled=False)).resumed_from == 2
    for key, value in teacher.state_dict().items():
        assert torch.allclose(fresh.state_dict()[key], value, atol=1e-6), key


def test_moe_options_on_a_dense_teacher_are_one_line() -> None:
    problem = check_moe_teacher(MoETeacherSpec(augment=2), tiny_llama().config)
    assert problem == "moe_teacher: the teacher is dense (no experts to sample or route)"
