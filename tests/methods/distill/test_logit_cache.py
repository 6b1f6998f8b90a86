"""The offline teacher-logit cache: exact at full width, reused across runs with identical
results, never used for a batch it was not computed on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.logit_cache import TeacherCacheSpec, bin_teacher
from knowpress.methods.distill.losses import forward_kl
from knowpress.methods.distill.trainer import Trainer, TrainSpec
from knowpress.pipeline.distill_data import DistillData
from knowpress.pipeline.recipe import validate_recipe
from knowpress.testing.models import tiny_llama, tiny_tokenizer

TEXTS = [" ".join(f"w{(i * 5 + j) % 60}" for j in range(16)) for i in range(48)]


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "gjsd", "tvd"])
def test_full_width_bins_give_the_full_loss(name: str) -> None:
    loss = DISTILL_LOSSES.get(name).model_validate({"name": name, "temperature": 2.0})
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    indices, logprobs = bin_teacher(t, 16, 2.0)
    assert loss.binned(s, indices, logprobs, mask, 10).item() == pytest.approx(
        loss(s, t, mask).item(), abs=1e-5
    )


def test_top_k_bins_keep_the_tail_mass() -> None:
    t = torch.randn(3, 32)
    indices, logprobs = bin_teacher(t, 4, 1.0)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(3), atol=1e-6)
    s = torch.randn(3, 32)
    # collapsing both sides into bins can only lose information: KL shrinks
    binned = (
        DISTILL_LOSSES.get("forward_kl")
        .model_validate({"name": "forward_kl"})
        .binned(s, indices, logprobs, torch.ones(3, dtype=torch.bool), 3)
    )
    assert binned.item() <= forward_kl(s.log_softmax(-1), t.log_softmax(-1)).mean().item()


def _run(cache: Path, seed: int = 0, read_only: bool = False) -> tuple[Trainer, Any]:
    tokenizer = tiny_tokenizer(64)
    data = DistillData(None, tokenizer, TEXTS, 8, 16, seed=seed)
    teacher = None if read_only else tiny_llama(seed=1, vocab_size=64).eval().requires_grad_(False)
    student = tiny_llama(seed=2, vocab_size=64, hidden_size=32, intermediate_size=32)
    loss = DISTILL_LOSSES.get("forward_kl").model_validate({"name": "forward_kl"})
    spec = TrainSpec(steps=4, batch_size=8, warmup=1)
    trainer = Trainer(student, teacher, loss, data, spec, None, 0.2, None, "k", None, None,
                      TeacherCacheSpec(path=str(cache), top_k=8, read_only=read_only))  # fmt: skip
    return trainer, trainer.run(Progress(enabled=False))


def test_a_second_run_reads_the_cache_and_ends_identically(tmp_path: Path) -> None:
    first, out1 = _run(tmp_path / "cache")
    second, out2 = _run(tmp_path / "cache")
    assert out1.cache == {"hits": 0, "misses": 4} and out2.cache == {"hits": 4, "misses": 0}
    for key, value in first.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[key], value), key
    _, other = _run(tmp_path / "cache", seed=5)  # other batches: the files do not match them
    assert other.cache["misses"] == 4
    # the files are per batch row: any number of processes reads its rows from them
    assert sorted(p.name for p in (tmp_path / "cache" / "step-0000000").iterdir()) == [
        f"row-{r:05d}.safetensors" for r in range(8)
    ]


def test_a_read_only_cache_trains_without_the_teacher(tmp_path: Path) -> None:
    first, _ = _run(tmp_path / "cache")
    second, out = _run(tmp_path / "cache", read_only=True)
    assert second.teacher is None and out.cache == {"hits": 4, "misses": 0}
    for key, value in first.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[key], value), key
    with pytest.raises(KnowpressError, match=r"teacher_cache\.read_only: step 1 .* not in"):
        _run(tmp_path / "cache", seed=5, read_only=True)  # other batches: no file matches


def test_a_read_only_cache_refuses_on_policy_batches() -> None:
    stage = {"kind": "distill", "teacher_cache": {"path": "./c", "read_only": True},
             "on_policy": {"rate": 0.5}}  # fmt: skip
    config = validate_recipe({"version": 1, "model": {"path": "./x"}, "stages": [stage]}).stages[0]
    assert not config.loads_teacher()
    with pytest.raises(KnowpressError, match=r"teacher_cache\.read_only: on-policy") as info:
        config.check(tiny_llama(), "bfloat16")
    assert "\n" not in str(info.value)


def test_the_cache_refuses_losses_that_need_whole_logits() -> None:
    stage = {"kind": "distill", "loss": {"name": "taid"}, "teacher_cache": {"path": "./c"}}
    config = validate_recipe({"version": 1, "model": {"path": "./x"}, "stages": [stage]}).stages[0]
    with pytest.raises(KnowpressError, match="loss 'taid' needs whole logits"):
        config.check(tiny_llama(), "bfloat16")
