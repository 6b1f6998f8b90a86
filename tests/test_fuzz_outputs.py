"""Where commands write, malformed: ``--force`` on folders knowpress did not write or on an
input of the same command, a full disk during an export or a distill checkpoint, artifacts
that changed since their manifest, ONNX bundles scored by ``compress eval``. Each refusal is
one line (exit 2) and leaves every file as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from test_fuzz_inputs import DISTILL, _one_error_line, recipe, run

from knowpress.cli.app import EXIT_USER
from knowpress.core.errors import KnowpressError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text("version: 1\n")  # a project's recipe marks nothing
    (path / "thesis.tex").write_text("years of work")
    return path


def test_apply_force_replaces_only_a_run_that_is_not_an_input(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _user_folder(tmp_path / "project")
    before = _snapshot(project)
    path = tmp_path / "r.yaml"
    path.write_text(recipe())
    code, err = run(["apply", str(path), "-o", str(project), "--force", "-q"], capsys)
    assert code == EXIT_USER and "is not a knowpress run (no knowpress_run.json)" in err
    assert _snapshot(project) == before
    # a run folder holding the recipe being run: --force would delete it
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "knowpress_run.json").write_text("{}")
    inside = run_dir / "r.yaml"
    inside.write_text(recipe())
    code, err = run(["apply", str(inside), "-o", str(run_dir), "--force", "-q"], capsys)
    assert code == EXIT_USER and "holds the recipe" in _one_error_line(err)
    assert inside.is_file()
    # the model's own folder, a folder holding it, a folder inside it
    model = shutil.copytree(tiny_teacher_dir, tmp_path / "runs" / "a" / "stages" / "01-model")
    (tmp_path / "runs" / "a" / "knowpress_run.json").write_text("{}")
    before = _snapshot(tmp_path / "runs")
    path.write_text(recipe(model={"path": str(model)}))
    cases = [(model, "is model.path"), (tmp_path / "runs" / "a", "holds model.path"),
             (model / "out", "is inside model.path")]  # fmt: skip
    for out, expected in cases:
        for extra in (["--force"], ["--resume"], ["--dry-run"]):
            code, err = run(["apply", str(path), "-o", str(out), "-q", *extra], capsys)
            assert code == EXIT_USER and expected in _one_error_line(err), err
    assert _snapshot(tmp_path / "runs") == before and not (model / "out").exists()


def test_the_library_apply_refuses_an_output_over_its_input(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    import yaml

    from knowpress.pipeline.recipe import validate_recipe
    from knowpress.pipeline.runner import apply

    model = shutil.copytree(tiny_teacher_dir, tmp_path / "model")
    (model / "knowpress_run.json").write_text("{}")
    before = _snapshot(model)
    data = yaml.safe_load(recipe(model={"path": str(model)}))
    with pytest.raises(KnowpressError, match=r"is model\.path"):
        apply(validate_recipe(data), model, force=True)
    assert _snapshot(model) == before


def _export(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return run(["export", *argv, "--weights", "float32", "-q"], capsys)


def test_export_force_replaces_only_a_bundle_that_is_not_its_input(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_teacher_dir, tmp_path / "run" / "stages" / "01-model")
    user = _user_folder(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    before = {p: _snapshot(p) for p in (tmp_path / "run", user)}
    cases = [
        ([str(user), "--force"], "--force: " + str(user) + " is not an export bundle"),
        ([str(user)], "is not empty; pass --force"),
        ([str(model), "--force"], "is the model folder"),
        ([str(tmp_path / "run"), "--force"], "holds the model folder"),
        ([str(model / "bundle")], "is inside the model folder"),
        ([str(tmp_path / "file"), "--force"], "is a file"),
    ]
    for target, expected in cases:
        code, err = _export([str(model), "-o", *target], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err), err
    assert {p: _snapshot(p) for p in before} == before
    assert not (model / "bundle").exists()


@pytest.fixture(scope="module")
def bundle(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher exported by ``compress export --store float16``."""
    from knowpress.cli.app import main

    out = tmp_path_factory.mktemp("bundle") / "b"
    argv = ["export", str(tiny_teacher_dir), "-o", str(out), "--weights", "float32"]
    assert main([*argv, "--store", "float16", "-q"]) == 0
    return out


def test_export_store_float16_and_force_over_its_own_bundle(
    bundle: Path, tiny_teacher_dir: Path
) -> None:
    from knowpress.cli.export import check_target
    from knowpress.pipeline.outdir import is_export_bundle

    record = json.loads((bundle / "knowpress_export.json").read_text())
    assert record["weights_info"]["float16_tensors"] > 0  # --store reached the export stage
    assert is_export_bundle(bundle)
    check_target(bundle, tiny_teacher_dir, force=True)  # its own bundle: replaceable
    with pytest.raises(KnowpressError, match="pass --force"):
        check_target(bundle, tiny_teacher_dir, force=False)


def test_eval_scores_an_onnx_bundle_and_refuses_a_changed_one(
    bundle: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = tmp_path / "scores.json"
    argv = ["eval", "--model", str(bundle), "--world", str(tiny_teacher_dir), "--tasks",
            "recall", "--max-items", "4", "--json", str(scores), "-q"]  # fmt: skip
    capsys.readouterr()
    code, err = run(argv, capsys)
    assert code == 0, err
    stored = json.loads((bundle / "knowpress_artifact.json").read_text())["stored_bytes"]
    assert json.loads(scores.read_text())["stored_bytes"] == stored
    changed = shutil.copytree(bundle, tmp_path / "changed")
    data = changed / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, other content
    data.write_bytes(bytes(blob))
    scores.unlink()
    code, err = run([*argv[:2], str(changed), *argv[3:]], capsys)
    line = _one_error_line(err)
    assert code == EXIT_USER and "model.onnx.data changed since it was written" in line
    assert line.startswith(f"error: --model: {changed}") and not scores.exists()


def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_in_a_library(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("protobuf: write failed: No space left on device")


def _full_without_errno(*args: Any, **kwargs: Any) -> None:
    raise OSError("problem writing element 44032 to file")  # numpy's tofile, under onnx


@pytest.mark.parametrize(
    "fail", [_full, _full_in_a_library, _full_without_errno], ids=["oserror", "library", "numpy"]
)
def test_disk_full_during_export_is_one_line_and_leaves_nothing(
    fail: Any, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """(Checked for real on a 600 KB tmpfs: numpy's "problem writing element" is what onnx's
    external-data writer raises there; the disk is then nearly full.)"""
    import knowpress.formats.io as models_io
    import knowpress.pipeline.export as pipeline

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(pipeline, "export_model", fail)
    monkeypatch.setattr(models_io.os, "statvfs", lambda path: Full())
    out = tmp_path / "bundle"
    code, err = _export([str(tiny_teacher_dir), "-o", str(out)], capsys)
    line = _one_error_line(err)
    assert code == EXIT_USER and f"disk full while writing: {out}" in line
    assert "--resume" not in line and not out.exists() and os.listdir(tmp_path) == []


def test_disk_full_while_a_distill_checkpoint_is_saved_keeps_the_last_one(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from safetensors import SafetensorError, safe_open

    import knowpress.core.train_state as train_state

    real = train_state.save_file
    calls: list[str] = []

    def full_after_one(tensors: Any, path: str, metadata: Any = None) -> None:
        calls.append(path)
        if len(calls) > 1:  # what safetensors raises on ENOSPC
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  'StorageFull, message: "No space left on device" })')  # fmt: skip
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_state, "save_file", full_after_one)
    stage = DISTILL | {"train": {"steps": 3, "batch_size": 4, "checkpoint_every": 1}}
    path = tmp_path / "r.yaml"
    path.write_text(recipe(stages=[stage], gate=None, evaluate={"tasks": ["recall"]}))
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q"], capsys)
    line = _one_error_line(err)
    assert code == EXIT_USER and "disk full while writing: " in line
    assert "train_state.safetensors; free some space, then rerun with --resume (" in line
    (saved,) = (tmp_path / "out" / "stages").glob(".resume-01-distill-*/train_state.safetensors")
    with safe_open(str(saved), "pt") as handle:
        assert handle.metadata()["step"] == "1"  # the last good checkpoint, whole
    assert not list(saved.parent.glob(".tmp-*"))


def test_disk_full_during_world_build_advises_what_the_command_has(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import knowpress.teachers

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/teachers/x")

    monkeypatch.setattr(knowpress.teachers, "build_teacher", full)
    for force, advice in [([], "then rerun (training continues from its last save"),
                          (["--force"], "then rerun without --force (training")]:  # fmt: skip
        code, err = run(["world", "build", "--preset", "test-tiny", "-q", *force], capsys)
        line = _one_error_line(err)
        assert code == EXIT_USER and advice in line and "--resume" not in line


def test_saved_weights_follow_the_umask(tmp_path: Path) -> None:
    from knowpress.formats.io import save_model
    from knowpress.testing.models import tiny_llama, tiny_tokenizer

    old = os.umask(0o027)
    try:
        save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "m")
    finally:
        os.umask(old)
    for file in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o640, file.name
