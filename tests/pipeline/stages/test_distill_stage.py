"""``kind: distill`` through the runner: a killed stage resumes mid-way with ``--resume``, the
student is an ordinary smaller checkpoint, a model without a world distils on a text file,
and stage orders that cannot work fail before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import knowpress.methods.distill.trainer as trainer_module
from knowpress.core.errors import KnowpressError
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.testing.models import tiny_llama, tiny_tokenizer

DISTILL = {"kind": "distill", "student": {"make": "width", "mlp_keep": 0.5},
           "loss": {"name": "taid"}, "on_policy": {"rate": 0.5, "max_new_tokens": 6},
           "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 2}}  # fmt: skip


def _recipe(*stages: dict[str, Any], **extra: Any) -> Any:
    data = {"version": 1, "model": {"world": "test-tiny"}, "stages": list(stages),
            "evaluate": {"tasks": ["recall", "kl"], "max_items": 8}, **extra}  # fmt: skip
    return validate_recipe(data)


def test_a_killed_distill_stage_resumes_from_its_checkpoint(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    calls = {"n": 0}
    real = trainer_module.batch_loss

    def killed(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as a kill between two saves
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "batch_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        apply(_recipe(DISTILL), out)
    left = list((out / "stages").glob(".resume-01-distill-*"))
    assert len(left) == 1 and (left[0] / "train_state.safetensors").is_file()
    monkeypatch.setattr(trainer_module, "batch_loss", real)
    report = apply(_recipe(DISTILL), out, resume=True).report
    details = report["stages"][0]["details"]
    assert details["resumed_from"] == 4 and details["steps"] == 6
    assert not list((out / "stages").glob(".resume-*"))  # spent once the stage is installed
    config = json.loads((out / "stages" / "01-distill" / "config.json").read_text())
    assert config["intermediate_size"] == details["student_config"]["intermediate_size"]
    assert 0 < details["student_share"] < 1 and "t" in details["schedule"]
    assert report["rows"][1]["scores"]["kl"] > 0


def test_a_model_without_a_world_distils_on_a_text_file(tmp_path: Path) -> None:
    plain_model_dir = tmp_path / "model"  # save_pretrained of a random Llama: no world
    tiny_llama(seed=3).save_pretrained(plain_model_dir)
    tiny_tokenizer().save_pretrained(plain_model_dir)
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line {i} says the river is {i % 7} metres deep" for i in range(64)))
    stage = {"kind": "distill", "student": {"make": "depth", "keep": 0.5},
             "train": {"steps": 3, "batch_size": 4}}  # fmt: skip
    recipe = validate_recipe({
        "version": 1, "model": {"path": str(plain_model_dir)}, "stages": [stage],
        "data": {"calibration": {"path": str(text)}},
        "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
    })  # fmt: skip
    report = apply(recipe, tmp_path / "out").report
    assert report["stages"][0]["details"]["student_config"]["num_hidden_layers"] == 1


def test_distill_after_quantize_fails_before_any_work(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    quantize = {"kind": "quantize", "method": {"name": "rtn", "bits": 8}}
    with pytest.raises(
        KnowpressError,
        match=r"stages\.1 \(distill\): changes float weights, "
        r"and stages\.0 packs them first: put the distill stage before quantize",
    ):
        apply(_recipe(quantize, DISTILL), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_delta_kd_runs_with_its_base_models_and_refuses_another_vocabulary(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    from knowpress.formats.io import load_model, save_model

    base, tokenizer = load_model(tiny_teacher_dir)
    with torch.no_grad():  # "the teacher before fine-tuning": a perturbed copy, same vocabulary
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(base, tokenizer, tmp_path / "base")
    stage = {"kind": "distill", "student": {"make": "depth", "keep": 0.5}, "sft_weight": 0.3,
             "loss": {"name": "delta_kd", "teacher_base": {"path": str(tmp_path / "base")}},
             "train": {"steps": 3, "batch_size": 8}}  # fmt: skip
    report = apply(_recipe(stage), tmp_path / "out").report
    assert report["stages"][0]["details"]["steps"] == 3
    other = tmp_path / "other"
    tiny_llama(vocab_size=40).save_pretrained(other)
    tiny_tokenizer(40).save_pretrained(other)
    stage["loss"] = {"name": "delta_kd", "teacher_base": {"path": str(other)}}
    with pytest.raises(KnowpressError, match=r"stages\.0\.loss\.teacher_base: its tokenizer"):
        apply(_recipe(stage), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # refused before the first write


def test_a_read_only_teacher_cache_trains_without_loading_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knowpress.pipeline.runner import Runner

    model = tmp_path / "model"
    tiny_llama(seed=3).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line {i} says the river is {i % 7} metres deep" for i in range(64)))

    def recipe(read_only: bool) -> Any:
        cache = {"path": str(tmp_path / "cache"), "top_k": 8, "read_only": read_only}
        stage = {"kind": "distill", "student": {"make": "depth", "keep": 0.5},
                 "teacher_cache": cache, "train": {"steps": 3, "batch_size": 4}}  # fmt: skip
        return validate_recipe({
            "version": 1, "model": {"path": str(model)}, "stages": [stage],
            "data": {"calibration": {"path": str(text)}},
            "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
        })  # fmt: skip

    written = apply(recipe(False), tmp_path / "writes").report["stages"][0]["details"]
    assert written["cache"] == {"hits": 0, "misses": 3} and "teacher_parameters" in written

    def no_teacher(self: Runner) -> Any:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(Runner, "teacher", no_teacher)
    read = apply(recipe(True), tmp_path / "reads").report["stages"][0]["details"]
    assert read["cache"] == {"hits": 3, "misses": 0} and "teacher_parameters" not in read
    assert abs(read["loss"] - written["loss"]) < 1e-6
