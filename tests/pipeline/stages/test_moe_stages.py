"""MoE stages through the runner. prune_experts: the pre-check stops a non-redundant model with
``on_risk: fail`` before anything is saved and lets a redundant one through; a global
budget's uneven counts are scored through knowpress's loader. skip_experts: its policy is
saved in the manifest and applied by evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.testing.models import tiny_mixtral, tiny_tokenizer


def _model(root: Path, redundant: bool) -> Path:
    """4 experts, top-2. Redundant: four copies of one expert (pruning changes nothing).
    Non-redundant: distinct experts with outputs large enough to move the logits."""
    model = tiny_mixtral(seed=4, layers=1)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        if redundant:
            experts.gate_up_proj.copy_(experts.gate_up_proj[:1].expand_as(experts.gate_up_proj))
            experts.down_proj.copy_(experts.down_proj[:1].expand_as(experts.down_proj))
        else:
            experts.down_proj.mul_(300.0)
            model.lm_head.weight.mul_(20.0)
    return _saved(model, root / ("redundant" if redundant else "distinct"))


def _saved(model: Any, folder: Path) -> Path:
    """``model`` and the tiny tokenizer as an HF folder a recipe can name."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _recipe(model: Path, text: Path, **stage: Any) -> Any:
    block = {"kind": "prune_experts", "sparsity": 0.5,
             "precheck": {"on_risk": "fail", "probe_samples": 4}, **stage}  # fmt: skip
    return validate_recipe({
        "version": 1, "model": {"path": str(model), "dtype": "float32"}, "stages": [block],
        "data": {"calibration": {"path": str(text), "samples": 24, "seq_len": 32}},
        "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
    })  # fmt: skip


@pytest.fixture
def text(tmp_path: Path) -> Path:
    file = tmp_path / "notes.txt"
    file.write_text("\n".join(f"w{i % 50} w{(i * 7) % 50} w{(i * 3) % 50} w{i % 13}"
                              for i in range(400)))  # fmt: skip
    return file


def test_the_precheck_stops_a_non_redundant_model(tmp_path: Path, text: Path) -> None:
    with pytest.raises(KnowpressError, match=r"requested sparsity exceeds what this model"):
        apply(_recipe(_model(tmp_path, redundant=False), text), tmp_path / "out")
    assert not list((tmp_path / "out" / "stages").glob("01-*"))


def test_a_redundant_model_passes_and_keeps_its_outputs(tmp_path: Path, text: Path) -> None:
    report = apply(_recipe(_model(tmp_path, redundant=True), text), tmp_path / "out").report
    details = report["stages"][0]["details"]
    assert details["precheck"]["tolerated_sparsity"] == 0.5 and not details["precheck"]["risk"]
    assert report["rows"][1]["scores"]["kl"] < 1e-6
    config = json.loads(
        (tmp_path / "out" / "stages" / "01-prune_experts" / "config.json").read_text()
    )
    assert config["num_local_experts"] == 2


def test_a_global_budget_is_scored_through_the_manifest(tmp_path: Path, text: Path) -> None:
    model = tiny_mixtral(seed=5, layers=2)
    with torch.no_grad():  # two silent experts in layer 0: the global budget cuts both there
        model.model.layers[0].mlp.experts.down_proj[:2].zero_()
    _saved(model, tmp_path / "m")
    recipe = _recipe(tmp_path / "m", text, sparsity=0.25, budget="global",
                     precheck={"enabled": False})  # fmt: skip
    report = apply(recipe, tmp_path / "out").report
    assert report["stages"][0]["details"]["experts_kept"] == {"0": [2, 3], "1": [0, 1, 2, 3]}
    folder = tmp_path / "out" / "stages" / "01-prune_experts"
    manifest = json.loads((folder / "knowpress_artifact.json").read_text())
    assert manifest["structure"] == {"experts_per_layer": [2, 4]}
    assert 0 <= report["rows"][1]["scores"]["kl"] < 0.01  # their tokens go to live experts


def test_quantizing_after_a_global_budget_fails_before_any_work(tmp_path: Path, text: Path) -> None:
    model = tiny_mixtral(seed=5, layers=2)
    _saved(model, tmp_path / "m")
    recipe = _recipe(tmp_path / "m", text, budget="global").model_dump(mode="json")
    recipe["stages"].append({"kind": "quantize", "method": {"name": "rtn", "bits": 8}})
    with pytest.raises(KnowpressError, match=r"uneven expert counts.*use budget: per_layer"):
        apply(validate_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_expert_skipping_is_saved_and_scored_as_a_runtime_policy(
    tmp_path: Path, text: Path
) -> None:
    from knowpress.runtimes.loader import load_runtime

    model = tiny_mixtral(seed=6, layers=2)
    _saved(model, tmp_path / "m")
    recipe = _recipe(tmp_path / "m", text).model_dump(mode="json")
    recipe["stages"] = [{"kind": "skip_experts", "policy": {"name": "odp", "beta": 0.9}}]
    report = apply(validate_recipe(recipe), tmp_path / "out").report
    details = report["stages"][0]["details"]
    assert 1.0 <= details["active_experts_per_token"] < 2.0
    assert details["active_expert_parameters_per_token"] < details[
        "routed_expert_parameters_per_token"]  # fmt: skip
    assert report["rows"][1]["runtime"]["expert_skip"] == "odp beta=0.9"
    assert report["rows"][1]["scores"]["kl"] > 0  # the skipped experts are missed
    runtime = load_runtime(tmp_path / "out" / "stages" / "01-skip_experts")
    assert runtime.expert_skip is not None  # type: ignore[attr-defined]


def test_a_moe_bit_plan_quantizes_experts_at_mixed_widths_within_budget(
    tmp_path: Path, text: Path
) -> None:
    model = tiny_mixtral(seed=7, layers=2)
    _saved(model, tmp_path / "m")
    recipe = _recipe(tmp_path / "m", text).model_dump(mode="json")
    recipe["stages"] = [{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32},
                         "ignore": ["lm_head", "re:.*self_attn.*"],
                         "bits_plan": {"name": "moe_lp", "avg_bits": 2.5}}]  # fmt: skip
    report = apply(validate_recipe(recipe), tmp_path / "out").report
    plan = report["stages"][0]["details"]["bits_plan"]
    widths = [b for bits in plan["expert_bits"].values() for b in bits]
    assert len(widths) == 8 and set(widths) <= {2, 3, 4} and plan["avg_bits"] <= 2.5
    assert len(set(widths)) > 1  # mixed, not one width for all
    stage = report["stages"][0]
    assert (
        abs(stage["bytes_after"] - stage["details"]["predicted_bytes"])
        < 0.01 * stage["bytes_after"]
    )
