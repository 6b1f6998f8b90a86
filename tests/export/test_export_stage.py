"""kind: export through the runner: GPTQ int4 codes carried into MatMulNBits, the ONNX row
scored by onnxruntime on every task next to the PyTorch rows, parity recorded; export last;
`compress export` on a stage folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowpress.core.errors import KnowpressError
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply

TASKS = ["recall", "paraphrase", "long_context", "perplexity", "kl"]


def _recipe(stages: list[dict]) -> object:  # type: ignore[type-arg]
    return validate_recipe({
        "version": 1, "model": {"world": "test-tiny"}, "stages": stages,
        "evaluate": {"tasks": TASKS, "max_items": 8},
    })  # fmt: skip


@pytest.mark.slow
def test_edge_pipeline_scores_the_onnx_row_on_every_task(tiny_teacher_dir: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    stages = [{"kind": "quantize", "method": {"name": "gptq", "bits": 4, "group_size": 32}},
              {"kind": "export", "weights": "int4"}]  # fmt: skip
    report = apply(_recipe(stages), tmp_path / "out").report
    quantized, exported = report["rows"][1], report["rows"][2]
    assert quantized["runtime"]["runtime"] == "torch"
    assert exported["runtime"]["runtime"] == "onnxruntime"
    assert set(exported["scores"]) == set(quantized["scores"])
    assert {k.split("/")[0] for k in exported["scores"]} >= set(TASKS)
    details = report["stages"][1]["details"]
    assert details["carried"] == report["stages"][0]["details"]["quantized_tensors"]
    assert details["requantized"] == 0 and details["parity_greedy_equal"] is True
    assert details["parity_max_rel_logits"] <= details["parity_max_rel_limit"]
    folder = tmp_path / "out" / "stages" / "02-export"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    # compress export on the quantize stage's folder writes the same kind of bundle
    from knowpress.cli.app import main

    bundle = tmp_path / "bundle"
    assert main(["export", str(tmp_path / "out" / "stages" / "01-quantize"), "-o", str(bundle),
                 "-q"]) == 0  # fmt: skip
    assert (bundle / "knowpress_artifact.json").is_file()
    assert main(["export", str(folder), "-o", str(tmp_path / "again")]) == 2  # already ONNX


def test_a_stage_after_export_is_refused_before_the_first_write(tmp_path: Path) -> None:
    from knowpress.pipeline.preflight import check_stages
    from knowpress.testing.models import tiny_llama

    recipe = _recipe([{"kind": "export"}, {"kind": "compress_kv",
                      "policy": {"name": "streaming", "budget": 9}}])  # fmt: skip
    with pytest.raises(KnowpressError, match=r"stages.1 \(compress_kv\) follows stages.0 "
                       r"\(export\).*put the export stage last"):  # fmt: skip
        check_stages(recipe, tiny_llama())  # type: ignore[arg-type]


def test_packed_experts_before_an_onnx_export_are_refused_at_dry_run() -> None:
    """A quantize stage that packs fused MoE experts, then ``export: onnx``: refused by the
    stage checks (the dry run) with the line the export would stop on, not after the run."""
    from knowpress.pipeline.preflight import check_stages
    from knowpress.testing.models import tiny_moe

    quantize = {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 16}}
    with pytest.raises(KnowpressError, match=r"stages.1 \(export\): model.layers.0.mlp.experts "
                       r"\(and 1 more\) are packed modules MatMulNBits cannot hold"):  # fmt: skip
        check_stages(_recipe([quantize, {"kind": "export"}]), tiny_moe("mixtral", layers=2))  # type: ignore[arg-type]
    ignored = {**quantize, "ignore": ["lm_head", "re:.*experts.*"]}  # experts left float
    check_stages(_recipe([ignored, {"kind": "export"}]), tiny_moe("mixtral", layers=2))  # type: ignore[arg-type]
