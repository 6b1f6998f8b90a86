"""The CLI: exit codes of apply / check, dry runs, eval on a stage checkpoint, list."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowpress.cli.app import EXIT_GATE, EXIT_INTERRUPT, EXIT_USER, main

RECIPE: dict[str, Any] = {
    "version": 1,
    "model": {"world": "test-tiny"},
    "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}}],
    "evaluate": {"tasks": ["recall", "perplexity"]},
    "gate": {"min_retention": 0.5},
}


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert main(["apply", str(recipe), "-o", str(root / "out"), "-q"]) == 0
    return root / "out"


def test_check_exit_codes(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = str(run_dir / "report.json")
    assert main(["check", report, "--min-retention", "0.5"]) == 0
    assert main(["check", str(run_dir)]) == 0  # floor from the recipe's gate
    data = json.loads((run_dir / "report.json").read_text())
    data["rows"][-1]["retention"]["recall"] = 0.8  # as if the stage had lost a fifth
    worse = run_dir.parent / "worse.json"
    worse.write_text(json.dumps(data))
    assert main(["check", str(worse), "--min-retention", "0.9"]) == EXIT_GATE
    out = capsys.readouterr().out
    assert "gate FAILED" in out and "recall" in out and "below min_retention" in out
    assert main(["check", str(worse), "--min-retention", "0.9", "--tasks", "perplexity"]) == 0
    assert main(["check", str(worse), "--min-retention", "0.85", "--tasks", "recall"]) == EXIT_GATE


def test_check_against_baseline(run_dir: Path, tmp_path: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert main(["check", str(run_dir), "--baseline", str(run_dir)]) == 0
    better = json.loads(json.dumps(report))
    better["rows"][-1]["retention"]["recall"] = report["rows"][-1]["retention"]["recall"] + 0.2
    (tmp_path / "old.json").write_text(json.dumps(better))
    code = main(["check", str(run_dir), "--baseline", str(tmp_path / "old.json")])
    assert code == EXIT_GATE


def test_check_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "missing.json"), "--min-retention", "0.9"]) == EXIT_USER
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    assert main(["check", str(tmp_path / "x.json"), "--min-retention", "0.9"]) == EXIT_USER
    err = capsys.readouterr().err
    assert "no such report" in err and "not a knowpress report" in err


def test_apply_gate_failure_exits_1_and_keeps_report(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """An untrained model with the teacher's tokenizer and world, gated against the teacher:
    a stage output that knows nothing fails the gate."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    blank = tmp_path / "blank"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_teacher_dir)).save_pretrained(
        blank
    )
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(blank)
    shutil.copy(tiny_teacher_dir / "knowpress_world.json", blank)
    recipe = tmp_path / "r.yaml"
    gated = {**RECIPE, "model": {"path": str(blank)}, "reference": {"world": "test-tiny"}}
    recipe.write_text(yaml.safe_dump(gated))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == EXIT_GATE
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gate"]["passed"] is False
    assert report["rows"][-1]["retention"]["recall"] < 0.5


def test_dry_run_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    assert not (tmp_path / "out").exists()
    out = capsys.readouterr().out
    assert "world preset test-tiny" in out and "rtn" in out


def test_bad_recipe_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": [{"kind": "prune"}]}))
    assert main(["apply", str(recipe), "--dry-run"]) == EXIT_USER
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.0.kind: unknown stage kind 'prune'" in err[0]


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "model": {"path": str(tmp_path / "nope")}}))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == EXIT_USER
    assert "does not exist" in capsys.readouterr().err


def test_an_error_holding_brackets_prints_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    missing = tmp_path / "[/x]" / "model"  # rich would read [/x] as a closing tag
    recipe.write_text(yaml.safe_dump({**RECIPE, "model": {"path": str(missing)}}))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == EXIT_USER
    assert f"{missing}" in capsys.readouterr().err


def test_eval_on_stage_checkpoint(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = tmp_path / "scores.json"
    checkpoint = run_dir / "stages" / "01-quantize"
    assert main(["eval", "--model", str(checkpoint), "--json", str(scores), "-q"]) == 0
    data = json.loads(scores.read_text())
    report = json.loads((run_dir / "report.json").read_text())
    row = report["rows"][1]
    assert data["scores"]["recall"]["score"] == row["scores"]["recall"]
    assert (data["stored_bytes"], data["parameters"]) == (row["stored_bytes"], row["parameters"])
    line = " ".join(capsys.readouterr().out.split())
    assert f"stored {row['stored_bytes']:,} bytes" in line
    assert f"{row['bits_per_parameter']:.2f} bits/param" in line and "on cpu in float32" in line


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("quantize", "rtn", "full", "recall", "perplexity", "bios-dense-tiny"):
        assert name in out


def test_gate_skips_near_chance_tasks_unless_named(run_dir: Path) -> None:
    from knowpress.evaluate.gate import check

    report = json.loads((run_dir / "report.json").read_text())
    report["tasks"]["perplexity"]["near_chance"] = True
    report["rows"][-1]["retention"]["perplexity"] = 0.1
    result = check(report, 0.5)
    assert result.passed and result.skipped == ["perplexity"]
    named = check(report, 0.5, tasks=["recall", "perplexity"])
    assert not named.passed and [f.task for f in named.failures] == ["perplexity"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_world_build_on_missing_gpu_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "build", "--preset", "test-tiny", "--device", "cuda", "-q"]) == EXIT_USER
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "use --device cpu" in err[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_apply_and_eval_on_missing_gpu_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    capsys.readouterr()
    assert main(["apply", str(recipe), "-o", str(tmp_path / "o"), "--device", "cuda"]) == EXIT_USER
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device: 'cuda' asked for, but this torch sees no CUDA GPU" in err[0]
    assert not (tmp_path / "o").exists()
    model = str(run_dir / "stages" / "01-quantize")
    assert main(["eval", "--model", model, "--device", "cuda:1", "-q"]) == EXIT_USER
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device: 'cuda:1' asked for" in err[0]


def test_sigterm_during_a_build_removes_its_temporary_directory(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) once the build's output directory exists exits 130 and leaves no
    ``.tmp-*`` output and no half-built teacher behind."""
    env = {**os.environ, "KNOWPRESS_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "knowpress.cli", "world", "build", "--preset", "test-tiny", "-q"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    teachers = tmp_path / "teachers"
    try:
        deadline = time.monotonic() + 120
        while not list(teachers.glob(".tmp-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPT, stderr
    assert "interrupted: training is saved every minute; rerun to continue" in stderr
    assert not list(teachers.glob(".tmp-*"))
    assert not [p for p in teachers.iterdir() if p.is_dir()]


def test_check_prints_each_gated_task_with_its_interval(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    row = report["rows"][-1]
    capsys.readouterr()
    assert main(["check", str(run_dir), "--min-retention", "0.5", "--confidence", "0.95"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "95% CI" in out and "MDE" in out and "exact McNemar" in out
    low, high = row["intervals"]["recall"]["retention"]
    assert f"[{low:.3f}, {high:.3f}]" in out  # the report's interval, recomputed at 0.95
    assert main(["check", str(run_dir), "--min-retention", "0.5", "--confidence", "0.8"]) == 0
    narrower = " ".join(capsys.readouterr().out.split())
    assert "80% CI" in narrower
