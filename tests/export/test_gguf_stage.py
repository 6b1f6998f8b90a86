"""kind: export, format: gguf through the runner (RTN int4 codes carried into Q4_0, the GGUF
row scored from the file next to the PyTorch rows) and `compress export --format gguf`; what
is refused before the first write: MoE models, a KV policy, weights of the other format."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from knowpress.cli.app import main
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply

pytest.importorskip("gguf")

TASKS = ["recall", "kl"]


def _recipe(stages: list[dict], world: str = "test-tiny") -> dict:  # type: ignore[type-arg]
    return {"version": 1, "model": {"world": world}, "stages": stages,
            "evaluate": {"tasks": TASKS, "max_items": 8}}  # fmt: skip


def test_the_gguf_row_scores_the_file_with_carried_codes(tiny_teacher_dir: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    stages = [{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}},
              {"kind": "export", "format": "gguf"}]  # fmt: skip
    report = apply(validate_recipe(_recipe(stages)), tmp_path / "out").report
    quantized, exported = report["rows"][1], report["rows"][2]
    assert quantized["runtime"]["runtime"] == "torch"
    assert exported["runtime"]["runtime"] == "torch-gguf"
    assert "not run by llama.cpp" in exported["runtime"]["note"]
    assert set(exported["scores"]) == set(quantized["scores"])
    details = report["stages"][1]["details"]
    assert details["carried"] == report["stages"][0]["details"]["quantized_tensors"]
    assert details["requantized"] == 0 and details["quantized"] == 1  # the tied embedding
    assert details["parity_max_abs_logits"] == 0.0 and details["parity_greedy_equal"] is True
    assert details["weights"].startswith("gguf q4_0 (Q4_0;")
    folder = tmp_path / "out" / "stages" / "02-export"
    assert exported["stored_bytes"] == (folder / "model.gguf").stat().st_size
    assert exported["size_vs_bf16_reference"] < 0.5
    assert report["stages"][1]["format"] == "gguf"
    # compress export --format gguf on the quantize stage's folder; the GGUF folder itself is
    # an export (not exported again), and --force replaces it
    bundle = tmp_path / "bundle"
    quantize = str(tmp_path / "out" / "stages" / "01-quantize")
    assert main(["export", quantize, "-o", str(bundle), "--format", "gguf", "-q"]) == 0
    assert (bundle / "model.gguf").stat().st_size == (folder / "model.gguf").stat().st_size
    assert main(["export", str(folder), "-o", str(tmp_path / "again"), "--format", "gguf"]) == 2
    assert main(["export", quantize, "-o", str(bundle), "--format", "gguf", "--weights",
                 "q8_0", "--force", "-q"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("stages", "world", "refused"),
    [
        ([{"kind": "export", "format": "gguf"}], "test-moe-tiny",
         r"stages.0 \(export\): GGUF export writes dense Llama-style models .*a mixture of "
         r"experts is not one: export it with format: onnx"),
        ([{"kind": "compress_kv", "policy": {"name": "streaming", "budget": 16}},
          {"kind": "export", "format": "gguf"}], "test-tiny",
         r"stages.1 \(export\): a GGUF file carries no KV policy, and KV policy streaming is "
         r"attached"),
        ([{"kind": "export", "format": "gguf", "weights": "int4"}], "test-tiny",
         r"stages.0: weights int4 is a format onnx weight type; format gguf takes q4_0, q8_0, "
         r"q4_k"),
        ([{"kind": "export", "weights": "q4_k"}], "test-tiny",
         r"stages.0: weights q4_k is a format gguf weight type; format onnx takes int4"),
        ([{"kind": "export", "format": "gguf", "block_size": 64}], "test-tiny",
         r"stages.0: block_size applies to format onnx only"),
    ],
)  # fmt: skip
def test_refused_at_dry_run_in_one_line(
    stages: list[dict],  # type: ignore[type-arg]
    world: str,
    refused: str,
    tmp_path: Path,
    dry_run: Callable[[dict[str, Any]], tuple[int, str]],
) -> None:
    code, err = dry_run(_recipe(stages, world))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(refused, err), err
    assert not (tmp_path / "out").exists()


def test_a_full_cache_policy_is_no_refusal(
    dry_run: Callable[[dict[str, Any]], tuple[int, str]],
) -> None:
    stages = [{"kind": "compress_kv", "policy": {"name": "full"}},
              {"kind": "export", "format": "gguf", "weights": "q8_0"}]  # fmt: skip
    code, err = dry_run(_recipe(stages))
    assert code == 0, err


def test_compress_export_refuses_onnx_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from knowpress.testing.models import tiny_llama, tiny_tokenizer

    model = tmp_path / "m"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    for extra, line in [
        (["--weights", "int8"], "--format gguf: weights int8 is a format onnx weight type"),
        (["--block-size", "64"], "--format gguf: block_size applies to format onnx only"),
    ]:
        capsys.readouterr()
        code = main(["export", str(model), "-o", str(tmp_path / "o"), "--format", "gguf", *extra])
        err = capsys.readouterr().err
        assert code == 2 and line in err, err
    assert not (tmp_path / "o").exists()
