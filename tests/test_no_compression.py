"""A compression stage that grows the model or changes nothing is flagged in the report (a
row flag and a warning) and fails a gate unless the recipe allows it (``shrinkage.py``):
a ``distill`` student larger than its teacher, a ``copy`` student, a ``compress_kv`` budget
larger than any context the cache is measured on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowpress.cli.app import EXIT_GATE, main
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.pipeline.shrinkage import judge

TRAIN = {"steps": 2, "batch_size": 4}


def _recipe(stage: dict[str, Any], **gate: Any) -> dict[str, Any]:
    return {"version": 1, "model": {"world": "test-tiny"}, "stages": [stage],
            "evaluate": {"tasks": ["recall"], "max_items": 8},
            "gate": {"min_retention": 0.1, **gate}}  # fmt: skip


LARGER = {"kind": "distill", "student": {"make": "config", "config": {"num_hidden_layers": 4}},
          "train": TRAIN}  # fmt: skip
COPY = {"kind": "distill", "student": {"make": "copy"}, "train": TRAIN}


@pytest.mark.parametrize(
    ("stage", "flag"), [(LARGER, "grew"), (COPY, "unchanged")], ids=["larger", "copy"]
)
def test_a_distill_stage_that_does_not_shrink_fails_the_gate(
    stage: dict[str, Any], flag: str, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    report = apply(validate_recipe(_recipe(stage)), tmp_path / "out").report
    row = report["rows"][1]
    assert row["compression"]["flag"] == flag
    teacher_bf16 = report["reference_bf16_bytes"]
    assert row["compression"]["input_bytes"] == pytest.approx(teacher_bf16, rel=0.01)
    if flag == "grew":  # two more layers of a two-layer teacher: ~1.7x its bytes
        assert row["stored_bytes"] > 1.5 * teacher_bf16
        assert (
            f"{row['stored_bytes'] / row['compression']['input_bytes']:.2f}x"
            in (row["compression"]["note"])
        )
    assert any(f"stage 1 (distill) did not compress ({flag})" in w for w in report["warnings"])
    gate = report["gate"]
    assert not gate["passed"] and gate["failures"][-1]["task"] == "01-distill"
    assert "did not compress" in (tmp_path / "out" / "report.md").read_text()


def test_a_kv_budget_above_every_context_fails_unless_allowed(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = {"kind": "compress_kv", "policy": {"name": "streaming"}, "budget": 100_000}
    recipe = tmp_path / "kv.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(stage)))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "a"), "-q"]) == EXIT_GATE
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    row, reference = report["rows"][1], report["rows"][0]
    assert row["kv_bytes_per_token"] == reference["kv_bytes_per_token"]
    assert row["compression"]["flag"] == "unchanged"
    assert "the same KV bytes/token" in row["compression"]["note"]
    capsys.readouterr()
    assert main(["check", str(tmp_path / "a"), "--min-retention", "0.1"]) == EXIT_GATE
    assert "did not compress (unchanged)" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "a"), "--min-retention", "0.1",
                 "--allow-no-compression"]) == 0  # fmt: skip
    recipe.write_text(yaml.safe_dump(_recipe(stage, allow_no_compression=True)))
    assert main(["apply", str(recipe), "-o", str(tmp_path / "b"), "-q"]) == 0
    allowed = json.loads((tmp_path / "b" / "report.json").read_text())
    assert allowed["rows"][1]["compression"]["flag"] == "unchanged"  # still said
    assert main(["check", str(tmp_path / "b")]) == 0  # the recipe's allowance is kept,
    assert main(["check", str(tmp_path / "b"), "--min-retention", "0.1"]) == 0  # bounds or not


def _row(stored: int, kv: float, policy: str | None = None) -> dict[str, Any]:
    return {"stored_bytes": stored, "kv_bytes_per_token": kv, "runtime": {"kv_policy": policy}}


def test_judge_compares_bytes_then_kv() -> None:
    given = {"bytes": 1000, "kv_bytes_per_token": 64.0}
    assert judge(_row(900, 64.0), "quantize", given)["flag"] is None  # fewer bytes
    assert judge(_row(1010, 32.0), "compress_kv", given)["flag"] is None  # a policy table, less KV
    assert judge(_row(1000, 64.0), "compress_kv", given)["flag"] == "unchanged"
    larger = judge(_row(1000, 128.0), "compress_kv", given)  # a sweep's next, larger budget
    assert larger["flag"] == "grew"
    assert larger["note"] == (
        "the same stored bytes as its input (1,000), a larger KV cache (128.0 vs 64.0 bytes/token)"
    )
    assert judge(_row(1650, 64.0), "distill", given)["flag"] == "grew"
    assert judge(_row(1650, 64.0), "export", given) is None  # a conversion, not judged
    unknown = {"bytes": 1000, "kv_bytes_per_token": None}  # model is not the reference
    assert judge(_row(1000, 64.0, "streaming"), "compress_kv", unknown)["flag"] is None
    assert judge(_row(1000, 64.0), "quantize", unknown)["flag"] == "unchanged"
    assert (
        judge(_row(1000, 64.0), "quantize", {"bytes": None, "kv_bytes_per_token": None})["flag"]
        is None
    )  # nothing to compare with
