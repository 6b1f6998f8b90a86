"""The distill trainer: accumulation is exact, on-policy batches come at rate λ (seeded), the
NaN guard stops before applying a bad step, and a killed run resumes where it saved."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import knowpress.methods.distill.trainer as trainer_module
from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.io import load_model
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.students import StudentSpec, make_student
from knowpress.methods.distill.trainer import (
    OnPolicySpec,
    Trainer,
    TrainSpec,
    batch_loss,
    generate_batch,
    is_on_policy,
)
from knowpress.pipeline.distill_data import DistillData
from knowpress.worlds import load_world


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir: Path) -> tuple[Any, Any, DistillData]:
    teacher, tokenizer = load_model(tiny_teacher_dir)
    data = DistillData(load_world(tiny_teacher_dir), tokenizer, None, 8, 64, seed=0)
    return teacher.eval().requires_grad_(False), tokenizer, data


def _student(teacher: Any) -> Any:
    student = make_student(StudentSpec(make="copy"), teacher, [])
    return student.requires_grad_(True)


def _trainer(setup: tuple[Any, Any, DistillData], tmp: Path | None, **spec: Any) -> Trainer:
    teacher, _, data = setup
    loss_block = spec.pop("loss", {"name": "forward_kl"})
    loss = DISTILL_LOSSES.get(loss_block["name"]).model_validate(loss_block)
    on_policy = spec.pop("on_policy", None)
    train = TrainSpec(**{"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup": 1, **spec})
    checkpoint = tmp / "state.safetensors" if tmp else None
    return Trainer(_student(teacher), teacher, loss, data, train, on_policy, 0.0, checkpoint, "k")


def test_gradient_accumulation_equals_one_big_batch(setup: Any) -> None:
    teacher, _, data = setup
    loss = DISTILL_LOSSES.get("gjsd").model_validate({"name": "gjsd"})
    grads = []
    for accum in (1, 3):
        student = _student(teacher)
        spec = TrainSpec(batch_size=8, grad_accum=accum)
        batch_loss(student, teacher, loss, data.batch(0), spec, 0.3, None)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_on_policy_steps_come_at_rate_lambda_and_are_seeded() -> None:
    draws = [is_on_policy(7, step, 0.3) for step in range(4000)]
    assert draws == [is_on_policy(7, step, 0.3) for step in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.03)
    assert not any(is_on_policy(7, step, 0.0) for step in range(100))


def test_the_trainer_uses_student_samples_at_those_steps(setup: Any, monkeypatch: Any) -> None:
    seen: list[bool] = []
    real = trainer_module.generate_batch

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "generate_batch", spy)
    trainer = _trainer(setup, None, on_policy=OnPolicySpec(rate=0.5, max_new_tokens=6))
    outcome = trainer.run(Progress(enabled=False))
    expected = sum(is_on_policy(0, step, 0.5) for step in range(6))
    assert outcome.on_policy_steps == len(seen) == expected > 0
    assert outcome.generate_seconds > 0


def test_generated_batches_label_the_continuation_up_to_the_first_eos(setup: Any) -> None:
    teacher, tokenizer, data = setup
    spec = OnPolicySpec(max_new_tokens=8)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, attention, labels = generate_batch(teacher, data.prompts(0), spec, pad, eos, 0)
    width = max(len(p) for p in data.prompts(0))
    assert (labels[:, :width] == -100).all() and (labels[:, width:] != -100).any()
    for row, lab, att in zip(ids, labels, attention, strict=True):
        new = row[width:].tolist()
        if tokenizer.eos_token_id in new:  # nothing after the first </s> is labelled
            end = width + new.index(tokenizer.eos_token_id)
            assert lab[end] == tokenizer.eos_token_id and (lab[end + 1 :] == -100).all()
            assert (att[end + 1 :] == 0).all()


def test_the_nan_guard_stops_before_the_bad_step_and_keeps_the_checkpoint(
    setup: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    calls = {"n": 0}
    real = trainer_module.batch_loss

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(trainer_module, "batch_loss", poisoned)
    trainer = _trainer(setup, tmp_path, checkpoint_every=2)
    before = copy.deepcopy(trainer.student.state_dict())
    with pytest.raises(KnowpressError, match=r"loss became nan at step 5 .*step 4 in"):
        trainer.run(Progress(enabled=False))
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as handle:
        assert (handle.metadata() or {})["step"] == "4"
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())


@pytest.mark.parametrize("loss", [{"name": "forward_kl"}, {"name": "taid", "alpha": 0.05}])
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_a_whole_run_ends(
    setup: Any, tmp_path: Path, monkeypatch: Any, loss: dict[str, Any]
) -> None:
    whole = _trainer(setup, None, loss=dict(loss))
    expected = whole.run(Progress(enabled=False))
    calls = {"n": 0}
    real = trainer_module.batch_loss

    def killed(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "batch_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        _trainer(setup, tmp_path, loss=dict(loss), checkpoint_every=2).run(Progress(False))
    monkeypatch.setattr(trainer_module, "batch_loss", real)
    resumed = _trainer(setup, tmp_path, loss=dict(loss), checkpoint_every=2)
    outcome = resumed.run(Progress(enabled=False))
    assert outcome.resumed_from == 4 and outcome.schedule == expected.schedule
    for key, value in whole.student.state_dict().items():
        assert torch.allclose(resumed.student.state_dict()[key], value, atol=1e-6), key
