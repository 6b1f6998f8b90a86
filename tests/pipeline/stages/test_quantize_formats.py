"""The quantize stage through the runner on a tiny Mixtral: its folder is compressed-tensors
where the released transformers loads the output (experts included), else knowpress's packed
format with the reason in the stage details and the manifest; either way the integrity check
passes and the folder is scored as stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.testing.models import tiny_mixtral, tiny_tokenizer

pytest.importorskip("compressed_tensors")

INT4 = {"name": "rtn", "bits": 4, "group_size": 16}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_mixtral(seed=7, layers=2)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"w{i % 50} w{(i * 7) % 50} w{(i * 3) % 50} w{i % 13}"
                              for i in range(400)))  # fmt: skip
    return tmp_path / "m", text


@pytest.mark.parametrize(
    ("stage", "fmt", "reason"),
    [
        ({"method": INT4}, "hf-compressed-tensors", None),
        ({"method": {"name": "gptq", "dtype": "mxfp4"}}, "hf-compressed-tensors", None),
        ({"method": {**INT4, "symmetric": False}}, "hf-packed", "transformers#47430"),
        ({"method": {"name": "rtn", "dtype": "nvfp4"}}, "hf-packed", "transformers#48371"),
        ({"method": INT4, "bits_plan": {"name": "moe_lp", "avg_bits": 3}}, "hf-packed",
         "its own width"),
    ],
)  # fmt: skip
def test_the_stage_folder_format_and_its_reason(
    stage: dict[str, Any], fmt: str, reason: str | None, setup: tuple[Path, Path], tmp_path: Path
) -> None:
    model, text = setup
    recipe = validate_recipe({
        "version": 1, "model": {"path": str(model), "dtype": "float32"},
        "stages": [{"kind": "quantize", **stage}],
        "data": {"calibration": {"path": str(text), "samples": 16, "seq_len": 32}},
        "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
    })  # fmt: skip
    report = apply(recipe, tmp_path / "out").report
    details = report["stages"][0]["details"]
    folder = next((tmp_path / "out" / "stages").glob("01-quantize"))
    manifest = json.loads((folder / "knowpress_artifact.json").read_text())
    assert manifest["format"] == fmt
    expected = "compressed-tensors" if fmt == "hf-compressed-tensors" else "knowpress"
    assert details["format"] == expected
    if reason is None:
        assert manifest.get("format_reason") is None and "format_reason" not in details
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    else:
        assert reason in manifest["format_reason"] and reason in details["format_reason"]
    row = report["rows"][-1]
    assert row["stored_bytes"] < report["rows"][0]["stored_bytes"]
