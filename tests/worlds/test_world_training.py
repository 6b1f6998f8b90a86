"""Teacher training: the epoch schedule, copy sequences, devices and exact resume from a
checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from knowpress.core.device import resolve_device
from knowpress.core.errors import KnowpressError
from knowpress.methods.distill.batches import Example, collate
from knowpress.teachers import build_teacher, training
from knowpress.teachers.teacher import resume_file
from knowpress.teachers.training import EpochBatches, encode_passages
from knowpress.worlds import Preset, WorldConfig
from knowpress.worlds.store import make_world, teacher_dir
from knowpress.worlds.tokenizer import build_tokenizer

MICRO = Preset(
    name="micro-resume",
    description="a few steps with fresh in-context passages per epoch",
    world=WorldConfig(n_people=6, attributes=("major", "employer"), bios_per_person=1,
                      in_context_examples=8, in_context_bios=2, in_context_questions=3),
    model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2},
    train={"steps": 24, "batch_size": 4, "warmup": 2, "in_context_loss": "questions",
           "copy_examples": 3, "copy_span": (2, 4)},
)  # fmt: skip


def test_epochs_draw_fresh_in_context_passages_and_keep_the_rest() -> None:
    world = make_world(MICRO.world)
    first, second = world.training_in_context(0), world.training_in_context(1)
    assert len(first) == len(second) == MICRO.world.in_context_examples
    assert not {p.context for p in first} & {p.context for p in second}
    assert world.training_in_context(1) == second  # deterministic per epoch
    schedule = EpochBatches(world, build_tokenizer(world), MICRO.train)
    again = EpochBatches(world, build_tokenizer(world), MICRO.train)
    steps = range(3 * schedule.per_epoch)
    assert [schedule.batch(s) for s in steps] == [again.batch(s) for s in reversed(steps)][::-1]


def test_passage_loss_is_on_its_questions_and_answers() -> None:
    world = make_world(MICRO.world)
    tokenizer = build_tokenizer(world)
    passage = next(p for p in world.training_in_context(0) if len(p.questions) == 3)
    [(ids, masked)] = encode_passages([passage], tokenizer, seq_len=512, mask_context=True)
    eos = tokenizer.eos_token_id
    assert ids[:masked] == tokenizer(passage.context)["input_ids"]  # <s> context
    qa = tokenizer([f"{q.prompt} {q.answer}" for q in passage.questions], add_special_tokens=False)
    assert ids[masked:] == [t for row in qa["input_ids"] for t in [*row, eos]]
    [(whole, zero)] = encode_passages([passage], tokenizer, seq_len=512, mask_context=False)
    assert whole == ids and zero == 0
    # too long for all questions: cut at a question boundary
    [(cut, _)] = encode_passages([passage], tokenizer, seq_len=len(ids) - 1, mask_context=True)
    assert cut[-1] == eos and cut.count(eos) == 2 and cut == ids[: len(cut)]
    _, _, labels = collate([(ids, masked), (ids[:5], 0)], tokenizer.pad_token_id)
    assert (labels[0] != -100).sum() == len(ids) - masked
    assert labels[1, :5].tolist() == ids[:5] and (labels[1, 5:] == -100).all()
    every = MICRO.train.model_copy(update={"in_context_loss": "all", "copy_examples": 0})
    assert all(m == 0 for row in EpochBatches(world, tokenizer, every)._batches for _, m in row)
    masked_rows = EpochBatches(world, tokenizer, MICRO.train)._batches
    n_masked = MICRO.world.in_context_examples + MICRO.train.copy_examples
    assert sum(m > 0 for row in masked_rows for _, m in row) == n_masked


def test_copy_examples_repeat_a_span_with_loss_on_the_copy() -> None:
    world = make_world(MICRO.world)
    tokenizer = build_tokenizer(world)
    rows = training.copy_examples(tokenizer, 60, (2, 5), random.Random(0))
    dot, special = tokenizer.convert_tokens_to_ids("."), set(tokenizer.all_special_ids)
    for ids, masked in rows:
        k = (len(ids) - 3) // 2  # <s> span . span </s>
        assert 2 <= k <= 5 and len(ids) == 2 * k + 3 and masked == k + 2
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids[k + 1] == dot and ids[1 : k + 1] == ids[k + 2 : -1]
        assert not (special | {dot}) & set(ids[1 : k + 1])
    assert {len(ids) for ids, _ in rows} == {7, 9, 11, 13}  # every span length drawn
    assert rows == training.copy_examples(tokenizer, 60, (2, 5), random.Random(0))
    assert training.copy_examples(tokenizer, 0, (2, 5), random.Random(0)) == []
    # the epoch holds exactly copy_examples of them, fresh each epoch
    schedule = EpochBatches(world, tokenizer, MICRO.train)

    def copies(epoch: int) -> list[Example]:
        schedule.batch(epoch * schedule.per_epoch)
        rows = [row for batch in schedule._batches for row in batch]
        return [(ids, m) for ids, m in rows if m > 2 and ids[m:-1] == ids[1 : m - 1]]

    first, second = copies(0), copies(1)
    assert len(first) == len(second) == MICRO.train.copy_examples and first != second


def test_copy_span_and_device_are_validated() -> None:
    with pytest.raises(ValueError, match="copy_span"):
        MICRO.train.model_validate({"steps": 1, "copy_span": (5, 2)})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KnowpressError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    with pytest.raises(KnowpressError, match="'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(KnowpressError, match=r"--device: 'cuda' asked for.*use --device cpu"):
            resolve_device("cuda", "--device")


def test_interrupted_build_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = build_teacher(MICRO, cache_dir=tmp_path / "a", progress=False)

    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)  # save after every step
    original = EpochBatches.batch

    def stop_at_step_10(self: EpochBatches, step: int) -> list[Example]:
        if step == 10:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(EpochBatches, "batch", stop_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        build_teacher(MICRO, cache_dir=tmp_path / "b", progress=False)
    final = teacher_dir(MICRO, tmp_path / "b")
    assert not final.exists() and resume_file(final).is_file()

    seen: list[int] = []

    def record(self: EpochBatches, step: int) -> list[Example]:
        seen.append(step)
        return original(self, step)

    monkeypatch.setattr(EpochBatches, "batch", record)
    resumed = build_teacher(MICRO, cache_dir=tmp_path / "b", progress=False)
    assert seen[0] == 10 and len(seen) == MICRO.train.steps - 10
    assert not resume_file(final).exists()
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_preset_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = MICRO.model_copy(update={"train": MICRO.train.model_copy(update={"seed": 5})})
    final = teacher_dir(MICRO, tmp_path)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    original = EpochBatches.batch

    def stop(self: EpochBatches, step: int) -> list[Example]:
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(EpochBatches, "batch", stop)
    with pytest.raises(KeyboardInterrupt):
        build_teacher(other, cache_dir=tmp_path, progress=False)
    # plant the other preset's state where MICRO's would be: it must start from step 0
    resume_file(teacher_dir(other, tmp_path)).rename(resume_file(final))
    seen: list[int] = []

    def record(self: EpochBatches, step: int) -> list[Example]:
        seen.append(step)
        return original(self, step)

    monkeypatch.setattr(EpochBatches, "batch", record)
    build_teacher(MICRO, cache_dir=tmp_path, progress=False)
    assert seen[0] == 0
