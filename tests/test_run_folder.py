"""The output folder as real processes use it: --force, the lock, resume verification,
interrupts and leftovers (subprocesses of ``python -m knowpress.cli``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowpress.cli.app import EXIT_INTERRUPT, EXIT_USER

STAGE = {"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}}
RECIPE: dict[str, Any] = {
    "version": 1,
    "model": {"world": "test-tiny"},
    "stages": [STAGE, {**STAGE, "method": {"name": "rtn", "bits": 4, "group_size": 32}}],
    "evaluate": {"tasks": ["recall", "perplexity"]},
    "gate": {"min_retention": 0.5},
}


def write_recipe(folder: Path, **changes: Any) -> Path:
    path = folder / f"recipe-{len(list(folder.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return path


def compress(*args: str, **popen: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "knowpress.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(condition: Any, what: str, proc: subprocess.Popen[str], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def test_force_replaces_a_run_only_when_the_new_one_can_start(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert finish(compress("apply", str(write_recipe(tmp_path)), "-o", str(out), "-q"))[0] == 0
    report = (out / "report.json").read_bytes()
    failing = write_recipe(tmp_path, evaluate={"tasks": ["two_hop"]})  # fails in preflight
    code, _, err = finish(compress("apply", str(failing), "-o", str(out), "--force", "-q"))
    assert code == EXIT_USER and "two_hop cannot be scored" in err
    assert (out / "report.json").read_bytes() == report  # the old run is untouched
    smaller = write_recipe(tmp_path, stages=[STAGE])
    assert finish(compress("apply", str(smaller), "-o", str(out), "--force", "-q"))[0] == 0
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01-quantize"]
    assert json.loads((out / "report.json").read_text())["stages"][0]["resumed"] is False


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """This test process holds the folder as a run does (``OutputFolder``, taken by the
    runner first thing); ``compress apply`` on it, even with --force, is one line."""
    from knowpress.pipeline.outdir import OutputFolder

    out = tmp_path / "out"
    with OutputFolder(out, resume=False, force=False) as held:
        held.first_write("test")
        code, _, err = finish(compress("apply", str(write_recipe(tmp_path)), "-o", str(out),
                                       "--force", "-q"))  # fmt: skip
        lines = err.strip().splitlines()
        assert code == EXIT_USER and len(lines) == 1, err
        assert f"being written by another run (PID {os.getpid()})" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".knowpress.lock", "knowpress_run.json"]
    # released with the holder: the same command now runs
    code, _, err = finish(compress("apply", str(write_recipe(tmp_path)), "-o", str(out),
                                   "--force", "-q"))  # fmt: skip
    assert code == 0, err


def test_resume_rebuilds_truncated_and_deleted_stages(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    out, recipe = tmp_path / "out", write_recipe(tmp_path)
    assert finish(compress("apply", str(recipe), "-o", str(out), "-q"))[0] == 0
    first, second = out / "stages" / "01-quantize", out / "stages" / "02-quantize"
    weights = first / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    subprocess.run(["rm", "-rf", str(second)], check=True)
    code, _, err = finish(compress("apply", str(recipe), "-o", str(out), "--resume", "-q"))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [s["resumed"] for s in report["stages"]] == [False, False]
    assert weights.stat().st_size == size
    assert report["rows"][2]["stored_bytes"] == (second / "model.safetensors").stat().st_size
    flipped = bytearray(weights.read_bytes())  # same size, other content: the hash sees it
    flipped[-1] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    finish(compress("apply", str(recipe), "-o", str(out), "--resume", "-q"))
    report = json.loads((out / "report.json").read_text())
    assert [s["resumed"] for s in report["stages"]] == [False, False]


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice-10ms-apart"])
def test_sigterm_while_evaluating_exits_130_without_a_traceback(
    signals: int, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = compress("apply", str(write_recipe(tmp_path)), "-o", str(out))  # progress bars on
    try:
        wait_for(lambda: (out / "recipe.yaml").is_file(), "the reference evaluation", proc)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        code, _, err = finish(proc, timeout=120)
    finally:
        proc.kill()
    assert code == EXIT_INTERRUPT, err
    assert "Traceback" not in err and "interrupted: finished stages are kept" in err
    assert not [p for p in out.rglob(".tmp-*")]


def test_leftover_temporaries_are_swept_when_the_folder_is_taken(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    out, recipe = tmp_path / "out", write_recipe(tmp_path, stages=[STAGE])
    assert finish(compress("apply", str(recipe), "-o", str(out), "-q"))[0] == 0
    # what SIGKILL during writes leaves: temporary files and folders, a half-swapped stage
    (out / ".tmp-retention_vs_size.png.k3j2h1.png").write_bytes(b"partial")
    (out / "stages" / ".tmp-01-quantize-1a2b3c4d").mkdir()
    (out / "stages" / ".old-01-quantize-5e6f7a8b").mkdir()
    code, _, err = finish(compress("apply", str(recipe), "-o", str(out), "--resume", "-q"))
    assert code == 0, err
    assert not [p.name for p in out.rglob(".tmp-*")] and not list(out.rglob(".old-*"))


def test_files_follow_the_umask(tmp_path: Path) -> None:
    from knowpress.core.io import atomic_write_text

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            atomic_write_text(tmp_path / f"r{mask}.json", "{}")
        finally:
            os.umask(old)
        assert (tmp_path / f"r{mask}.json").stat().st_mode & 0o777 == mode
