"""benchmarks/gpu_smoke.sh: it parses, and without a GPU it says so in one line and exits 2;
the helper's report reading and its timeout kill."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _helper() -> ModuleType:
    path = ROOT / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_without_a_gpu_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = dict(os.environ, GPU_SMOKE_NVIDIA_SMI=str(tmp_path / "no-nvidia-smi"),
               CUDA_VISIBLE_DEVICES="")  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_smoke: no CUDA GPU here")
    assert "nothing was run" in lines[0]
    assert not out.exists()
    assert time.monotonic() - start < 10


def test_a_gpu_no_torch_sees_is_one_line_and_exit_2(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Test GPU (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    env = dict(os.environ, GPU_SMOKE_NVIDIA_SMI=str(smi), GPU_SMOKE_PYTHON="/bin/false",
               CUDA_VISIBLE_DEVICES="")  # fmt: skip
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "smoke.json")],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "GPU 0: Test GPU" in lines[0] and "no Python here has a torch that sees it" in lines[0]
    assert not (tmp_path / "smoke.json").exists()


def test_report_figures_read_the_final_row(tmp_path: Path) -> None:
    report = {
        "rows": [
            {"name": "reference", "stored_bytes": 10},
            {
                "name": "02-quantize",
                "stored_bytes": 4,
                "size_vs_bf16_reference": 0.4,
                "retention": {"recall": 0.9},
                "worst_retention": 0.9,
                "scores": {"recall": 0.9, "kl": 0.25},
                "runtime": {"device": "cuda"},
            },
        ],
        "stages": [{"kind": "quantize", "seconds": 1.5}],
        "execution": {"device": "cuda"},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    figures = _helper().report_figures(tmp_path / "report.json")
    assert figures["final_row"] == "02-quantize"
    assert (figures["stored_bytes"], figures["kl"]) == (4, 0.25)
    assert figures["retention"] == {"recall": 0.9}
    assert figures["stage_seconds"] == [{"kind": "quantize", "seconds": 1.5}]
    assert _helper().report_figures(tmp_path / "missing.json") is None


def test_a_step_past_its_timeout_is_killed_with_its_group(tmp_path: Path) -> None:
    helper = _helper()
    argv = [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '60'])"]
    result = helper.run_process(argv, 1.0, tmp_path / "log", dict(os.environ))
    assert result["timed_out"] is True
    assert result["wall_s"] < 15
    assert result["exit_code"] != 0
