"""``accelerate launch -m knowpress.cli apply`` with 2 CPU processes (gloo), data-parallel or
FSDP2-sharded, trains the same student as one process, and launches knowpress cannot serve
fail in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from knowpress.cli.app import EXIT_USER, main
from knowpress.core.errors import KnowpressError
from knowpress.pipeline.launch import join
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.testing.models import tiny_llama, tiny_tokenizer

STAGE = {"kind": "distill", "student": {"make": "width", "mlp_keep": 0.5},
         "loss": {"name": "taid"}, "on_policy": {"rate": 0.5, "max_new_tokens": 4},
         "train": {"steps": 4, "batch_size": 8, "seq_len": 16, "checkpoint_every": 2,
                   "warmup": 1, "lr": 0.01}}  # fmt: skip


def _recipe(root: Path) -> dict[str, object]:
    model = root / "model"
    tiny_llama(seed=3).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = root / "notes.txt"  # many short rows: every batch has 8, 4 per process
    lines = [f"line {i} says the river is {i % 7} metres deep" for i in range(256)]
    text.write_text("\n".join(lines))
    return {"version": 1, "model": {"path": str(model), "dtype": "float32"}, "stages": [STAGE],
            "data": {"calibration": {"path": str(text)}},
            "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}}}  # fmt: skip


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
@pytest.mark.parametrize(
    "flags", [["--multi_gpu"], ["--use_fsdp", "--fsdp_version", "2"]], ids=["ddp", "fsdp2"]
)
def test_two_launched_processes_train_what_one_process_trains(
    tmp_path: Path, flags: list[str]
) -> None:
    data = _recipe(tmp_path)
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(data))
    one = apply(validate_recipe(data), tmp_path / "one").report
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = ["accelerate", "launch", *flags, "--num_processes", "2"]
    cmd = [*launch, "-m", "knowpress.cli", "apply", str(file), "-o", str(tmp_path / "two"), "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    a, b = (one["stages"][0]["details"], two["stages"][0]["details"])
    assert a["on_policy_steps"] == b["on_policy_steps"] > 0
    assert "parallel" not in a and b["parallel"] == {"processes": 2, "fsdp": "--use_fsdp" in flags}
    assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["schedule"]["t"] - b["schedule"]["t"]) < 1e-6
    first = load_file(str(tmp_path / "one" / "stages" / "01-distill" / "model.safetensors"))
    second = load_file(str(tmp_path / "two" / "stages" / "01-distill" / "model.safetensors"))
    assert set(first) == set(second)  # the same layout: names, shapes, dtypes, config
    assert all(first[k].shape == second[k].shape and first[k].dtype == second[k].dtype
               for k in first)  # fmt: skip
    gap = max((first[k] - second[k]).abs().max().item() for k in first)
    print(f"{' '.join(flags)}: max |two processes - one| = {gap:.2e}")
    assert gap < 1e-4
    configs = [json.loads((tmp_path / r / "stages" / "01-distill" / "config.json").read_text())
               for r in ("one", "two")]  # fmt: skip
    assert configs[0] == configs[1]
    assert first["model.layers.0.mlp.up_proj.weight"].shape[0] == 64  # half of 128


def test_a_launched_process_outside_the_cli_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KnowpressError, match=r"accelerate launch -m knowpress\.cli apply"):
        apply(validate_recipe(_recipe(tmp_path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "add --fsdp_version 2"),
     ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported")],
    ids=["fsdp1", "deepspeed"],
)  # fmt: skip
def test_a_launch_knowpress_cannot_serve_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str], message: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KnowpressError, match=message):
        join(validate_recipe(_recipe(tmp_path)))
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(_recipe(tmp_path)))
    capsys.readouterr()  # what saving the tiny model printed
    assert main(["apply", str(file), "-o", str(tmp_path / "out"), "-q"]) == EXIT_USER
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_a_teacher_a_stage_left_sharded_is_loaded_again(tmp_path: Path) -> None:
    """After an FSDP distill stage the runner's teacher is sharded (its forwards need every
    process): the next stage that needs it gets a fresh whole copy."""
    import torch.distributed as dist

    from knowpress.methods.distill import fsdp
    from knowpress.pipeline.runner import Runner

    loads: list[object] = []

    class Source:
        def load(self, device: str) -> tuple[object, None]:
            loads.append(tiny_llama(seed=1))
            return loads[-1], None

    runner = Runner.__new__(Runner)
    runner._teacher, runner.teacher_src, runner.device = None, Source(), "cpu"
    first = runner.teacher()
    assert runner.teacher() is first and len(loads) == 1  # kept while whole
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        fsdp.shard(first)
        assert fsdp.is_sharded(first)
        second = runner.teacher()
        assert second is not first and not fsdp.is_sharded(second) and len(loads) == 2
    finally:
        dist.destroy_process_group()
