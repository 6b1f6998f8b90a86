"""Two CPU processes (gloo) under FSDP2 (``fully_shard``: student and teacher sharded) train
the same student as one process: TAID's schedule, GKD's on-policy batches, a checkpoint
gathered on rank 0 and a resume from it, the student gathered back whole, and training from
a logit cache one process wrote, without a teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from knowpress.core.progress import Progress
from knowpress.methods.distill import DISTILL_LOSSES, fsdp
from knowpress.methods.distill.logit_cache import TeacherCacheSpec
from knowpress.methods.distill.trainer import OnPolicySpec, Trainer, TrainSpec
from knowpress.pipeline.distill_data import DistillData
from knowpress.testing.models import tiny_llama, tiny_tokenizer

TEXTS = [" ".join(f"w{(i * 11 + j) % 60}" for j in range(4 + i % 9)) for i in range(64)]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
SPEC = TrainSpec(steps=4, batch_size=7, warmup=1, checkpoint_every=2)  # 7 rows: 4 + 3


def _trainer(checkpoint: Path | None, cache: TeacherCacheSpec | None = None) -> Trainer:
    """TAID with on-policy batches; with ``cache``: forward KL from the logit cache (and no
    teacher when it is read-only)."""
    torch.manual_seed(0)
    data = DistillData(None, tiny_tokenizer(64), TEXTS, SPEC.batch_size, 16, seed=0)
    teacher = tiny_llama(seed=1, vocab_size=64).eval().requires_grad_(False)
    student = tiny_llama(seed=2, vocab_size=64, hidden_size=32, intermediate_size=32)
    if cache is not None:
        loss = DISTILL_LOSSES.get("forward_kl").model_validate({"name": "forward_kl"})
        return Trainer(student, None if cache.read_only else teacher, loss, data, SPEC, None,
                       0.2, checkpoint, "k", cache=cache)  # fmt: skip
    loss = DISTILL_LOSSES.get("taid").model_validate({"name": "taid", "alpha": 0.05})
    on_policy = OnPolicySpec(rate=0.5, max_new_tokens=4)
    return Trainer(student, teacher, loss, data, SPEC, on_policy, 0.2, checkpoint, "k")


def _train(checkpoint: Path | None, cache: TeacherCacheSpec | None = None
           ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Train (resuming from ``checkpoint`` when it holds a save); the student's weights
    (gathered on rank 0 under FSDP), TAID's t, the on-policy step count and cache hits."""
    trainer = _trainer(checkpoint, cache)
    outcome = trainer.run(Progress(enabled=False))
    student = trainer.student
    if fsdp.is_sharded(student):
        assert trainer.teacher is None or fsdp.is_sharded(trainer.teacher)
        student = fsdp.plain_model(student, "cpu")
        if student is None:
            return {}
        assert not fsdp.is_sharded(student)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    state["_t"] = torch.tensor(outcome.schedule.get("t", -1.0))
    state["_on_policy"] = torch.tensor(outcome.on_policy_steps)
    state["_resumed"] = torch.tensor(outcome.resumed_from)
    state["_hits"] = torch.tensor(outcome.cache.get("hits", -1))
    return state


def _worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(FSDP_ENV)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert fsdp.active()
        root = Path(folder)
        whole = _train(root / "first" / "train_state.safetensors")  # 4 steps, saved at 2
        again = root / "again" / "train_state.safetensors"
        if rank == 0:  # a copy of the step-2 save, to resume from under FSDP
            again.parent.mkdir()
            again.write_bytes((root / "first" / "train_state.safetensors").read_bytes())
        dist.barrier()
        resumed = _train(again)
        cached = _train(None, TeacherCacheSpec(path=f"{folder}/cache", top_k=8, read_only=True))
        if rank == 0:
            for name, state in (("whole", whole), ("resumed", resumed), ("cached", cached)):
                save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/{name}.st")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_fsdp_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", *FSDP_ENV):
        monkeypatch.delenv(name, raising=False)
    one = _train(tmp_path / "one" / "train_state.safetensors")
    one_cached = _train(None, TeacherCacheSpec(path=str(tmp_path / "cache"), top_k=8))
    assert not fsdp.active()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    whole, resumed, cached = (load_file(str(tmp_path / f"{n}.st"))
                              for n in ("whole", "resumed", "cached"))  # fmt: skip
    assert int(resumed["_resumed"]) == 2 and int(whole["_resumed"]) == 0
    assert 0 < int(one["_on_policy"]) == int(whole["_on_policy"]) == int(resumed["_on_policy"])
    assert abs(whole["_t"].item() - one["_t"].item()) < 1e-6  # TAID's t saw the same losses
    assert abs(resumed["_t"].item() - one["_t"].item()) < 1e-6
    # the checkpoint FSDP gathered is one process's: the same tensors (AdamW's moments are
    # as large as the summed gradients) in the same layout, and one process resumes it
    saved, ours = (
        load_file(str(tmp_path / n / "train_state.safetensors")) for n in ("first", "one")
    )
    assert set(saved) == set(ours) and any(k.startswith("adam.") for k in ours)
    for key, value in ours.items():
        assert (saved[key] - value).abs().max() <= 1e-3 * value.abs().max(), key
    assert set(whole) == set(one)  # the same layout as one process's student
    weights = [k for k in one if not k.startswith("_")]
    for two in (whole, resumed):
        assert all(two[k].shape == one[k].shape and two[k].dtype == one[k].dtype for k in weights)
        gap = max((two[k] - one[k]).abs().max().item() for k in weights)
        print(f"max |FSDP - one process| = {gap:.2e}")
        assert gap < 1e-4
    # a cache one process wrote, read by two FSDP processes without a teacher (each its rows)
    assert int(cached["_hits"]) == SPEC.steps and int(one_cached["_hits"]) == 0
    gap = max((cached[k] - one_cached[k]).abs().max().item() for k in weights)
    print(f"max |FSDP from the cache - one process| = {gap:.2e}")
    assert gap < 1e-4
    start = tiny_llama(seed=2, vocab_size=64, hidden_size=32, intermediate_size=32).state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in weights) > 1e-3  # it trained
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "train_state.safetensors").write_bytes(
        (tmp_path / "first" / "train_state.safetensors").read_bytes()
    )
    solo = _train(tmp_path / "solo" / "train_state.safetensors")
    assert int(solo["_resumed"]) == 2
    assert max((solo[k] - one[k]).abs().max().item() for k in weights) < 1e-4
