"""Two CPU processes (gloo) train the same student as one process: rows split per rank,
every loss divided by the whole batch's token count, gradients summed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from knowpress.core.progress import Progress
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.trainer import Trainer, TrainSpec
from knowpress.pipeline.distill_data import DistillData
from knowpress.testing.models import tiny_llama, tiny_tokenizer

TEXTS = [" ".join(f"w{(i * 11 + j) % 60}" for j in range(4 + i % 9)) for i in range(64)]


def _train(out: Path | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    data = DistillData(None, tiny_tokenizer(64), TEXTS, 8, 16, seed=0)
    teacher = tiny_llama(seed=1, vocab_size=64).eval().requires_grad_(False)
    student = tiny_llama(seed=2, vocab_size=64, hidden_size=32, intermediate_size=32)
    loss = DISTILL_LOSSES.get("taid").model_validate({"name": "taid", "alpha": 0.05})
    trainer = Trainer(student, teacher, loss, data, TrainSpec(steps=3, batch_size=8, warmup=1),
                      None, 0.2, None, "k")  # fmt: skip
    outcome = trainer.run(Progress(enabled=False))
    state = {k: v.clone() for k, v in student.state_dict().items()}
    state["_t"] = torch.tensor(outcome.schedule["t"])
    return state


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state = _train()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path: Path) -> None:
    one = _train()
    out = tmp_path / "two.safetensors"
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, init, str(out)), nprocs=2, join=True)
    two = load_file(str(out))
    assert abs(two["_t"].item() - one["_t"].item()) < 1e-6  # TAID's t saw the same losses
    for key, value in one.items():
        assert torch.allclose(two[key], value, atol=1e-5), key
