"""A sensitivity bit plan through the runner on a tiny Llama: the folder holds exactly the
bytes the plan chose (codes, scales, zero points of every planned linear), within its byte
budget, at mixed widths; symmetric widths are stored as compressed-tensors config groups,
asymmetric ones fall back to knowpress's packed format with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowpress.formats.sizes import read_header, safetensors_files
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.testing.models import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize(("symmetric", "fmt"), [(True, "hf-compressed-tensors"),
                                                (False, "hf-packed")])  # fmt: skip
def test_the_folder_stores_the_planned_bytes(symmetric: bool, fmt: str, tmp_path: Path) -> None:
    if symmetric:
        pytest.importorskip("compressed_tensors")
    tiny_llama(seed=3, layers=2).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"w{i % 50} w{(i * 7) % 50} w{(i * 3) % 50} w{i % 13}"
                              for i in range(400)))  # fmt: skip
    recipe = validate_recipe({
        "version": 1, "model": {"path": str(tmp_path / "m"), "dtype": "float32"},
        "stages": [{"kind": "quantize",
                    "method": {"name": "gptq", "bits": 3, "group_size": 32,
                               "symmetric": symmetric},
                    "bits_plan": {"name": "sensitivity", "avg_bits": 3.0}}],
        "data": {"calibration": {"path": str(text), "samples": 16, "seq_len": 32}},
        "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
    })  # fmt: skip
    report = apply(recipe, tmp_path / "out").report
    stage = report["stages"][0]
    plan = stage["details"]["bits_plan"]
    assert plan["planned_bytes"] <= plan["budget_bytes"] and len(plan["widths"]) == 14
    assert len(set(plan["widths"].values())) > 1  # mixed, not one width for all
    folder = tmp_path / "out" / "stages" / "01-quantize"
    assert json.loads((folder / "knowpress_artifact.json").read_text())["format"] == fmt
    # the planned linears' stored tensors, read from the folder, are the plan's bytes exactly
    modules = {name.rpartition(".")[0] for name in plan["widths"]}
    stored = 0
    for file in safetensors_files(folder):
        for name, info in read_header(file).items():
            if name.rpartition(".")[0] in modules and "bias" not in name:
                start, end = info["data_offsets"]
                stored += end - start
    assert stored == plan["planned_bytes"]
    predicted = stage["details"]["predicted_bytes"]
    assert abs(stage["bytes_after"] - predicted) <= 0.01 * stage["bytes_after"]
    if not symmetric:
        assert "its asymmetric linears" in stage["details"]["format_reason"]
