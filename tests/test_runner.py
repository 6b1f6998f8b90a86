"""The runner end to end on the tiny fact world: checkpoints, report, resume, atomicity."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from knowpress.core.errors import KnowpressError
from knowpress.formats.manifest import read_manifest
from knowpress.pipeline.recipe import Recipe, validate_recipe
from knowpress.pipeline.report import REQUIRED_KEYS, load_report
from knowpress.pipeline.runner import apply
from knowpress.pipeline.stages.quantize import Quantize


def recipe(**changes: Any) -> Recipe:
    data: dict[str, Any] = {
        "version": 1,
        "model": {"world": "test-tiny"},
        "stages": [
            {"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}},
            {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}},
        ],
        "evaluate": {"tasks": ["recall", "perplexity"]},
        "gate": {"min_retention": 0.5},
    }
    data.update(changes)
    return validate_recipe(data)


def fail_int4_stage(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the int4 quantize stage (stage 2 of ``recipe()``) raise ``error``."""
    original = Quantize.run

    def failing(self: Quantize, ctx: Any, progress: Any) -> Any:
        if self.config.method.bits == 4:  # type: ignore[attr-defined]
            raise error
        return original(self, ctx, progress)

    monkeypatch.setattr(Quantize, "run", failing)


RUN_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def finished_run(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    start = time.perf_counter()
    apply(recipe(), out)
    RUN_SECONDS.append(time.perf_counter() - start)
    return out


def test_layout_and_report_schema(finished_run: Path) -> None:
    out = finished_run
    for name in ("report.json", "report.md", "retention_vs_size.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    report = load_report(out / "report.json")
    assert all(key in report for key in REQUIRED_KEYS)
    assert report["schema_version"] == 3
    for row in report["rows"]:  # every figure carries its interval, every stage its check
        for task in ("recall", "perplexity"):
            low, high = row["intervals"][task]["retention"]
            assert low <= row["retention"][task] <= high
        assert row["items"]["recall"]["statistic"] == "accuracy"
    assert [row["compression"]["flag"] for row in report["rows"][1:]] == [None, None]
    assert [row["name"] for row in report["rows"]] == ["reference", "01-quantize", "02-quantize"]
    reference = report["rows"][0]
    assert reference["scores"]["recall"] >= 0.9  # the test teacher knows its facts
    assert reference["retention"] == {"recall": 1.0, "perplexity": 1.0}
    for stage in ("01-quantize", "02-quantize"):
        folder = out / "stages" / stage
        assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
        assert (folder / "knowpress_stage.json").is_file() and (folder / "eval.json").is_file()
        manifest = read_manifest(folder)
        assert manifest is not None and manifest.format == "hf-compressed-tensors"
        assert list(manifest.files) == ["model.safetensors"] and manifest.dtype == "bfloat16"
    assert not list((out / "stages").glob(".tmp-*"))
    # computed in float32 on the CPU; the cache counted as deployed, in bfloat16
    assert all(row["runtime"] == {"runtime": "torch", "device": "cpu", "dtype": "float32",
                                  "kv_policy": None, "kv_dtype": "bfloat16"}
               for row in report["rows"])  # fmt: skip


def test_sizes_are_stored_bytes_and_shrink(finished_run: Path) -> None:
    report = load_report(finished_run)
    teacher, int8, int4 = (row["stored_bytes"] for row in report["rows"])
    on_disk = [
        sum(f.stat().st_size for f in (finished_run / "stages" / s).glob("*.safetensors"))
        for s in ("01-quantize", "02-quantize")
    ]
    assert [int8, int4] == on_disk
    assert int4 < int8 < teacher
    stages = report["stages"]
    assert stages[0]["bytes_before"] == teacher and stages[1]["bytes_before"] == int8
    # the fp32 model itself is resident while a stage runs; a stage is part of the run
    assert all(s["peak_rss_bytes"] > teacher and s["seconds"] < RUN_SECONDS[0] for s in stages)


def test_sizes_are_against_the_bf16_reference_and_match_the_plan(finished_run: Path) -> None:
    report = load_report(finished_run)
    reference = report["rows"][0]
    params = reference["parameters"]
    # the test teacher is stored in fp32: its bf16 copy is half its bytes (plus the header)
    assert report["reference_bf16_bytes"] == pytest.approx(reference["stored_bytes"] / 2, rel=0.01)
    for row, stage in zip(report["rows"][1:], report["stages"], strict=True):
        assert row["size_vs_bf16_reference"] == row["stored_bytes"] / report["reference_bf16_bytes"]
        assert row["bits_per_parameter"] == 8 * row["stored_bytes"] / params
        assert row["parameters"] == params  # packed layers count their logical weights
        predicted = stage["details"]["predicted_bytes"]
        assert abs(predicted - row["stored_bytes"]) <= 0.01 * row["stored_bytes"]
    assert reference["bits_per_parameter"] == pytest.approx(32.0, rel=0.01)


def test_retention_is_ratio_to_reference(finished_run: Path) -> None:
    report = load_report(finished_run)
    teacher = report["rows"][0]["scores"]
    for row in report["rows"][1:]:
        assert row["retention"]["recall"] == pytest.approx(
            row["scores"]["recall"] / teacher["recall"]
        )
        assert row["retention"]["perplexity"] == pytest.approx(
            teacher["perplexity"] / row["scores"]["perplexity"]
        )
        assert row["worst_retention"] == min(row["retention"].values())
    assert report["gate"]["passed"] is True


def test_existing_output_needs_force(finished_run: Path) -> None:
    before = (finished_run / "report.json").read_bytes()
    with pytest.raises(KnowpressError, match=r"already exists; pass --resume .* or --force"):
        apply(recipe(), finished_run)
    assert (finished_run / "report.json").read_bytes() == before


def test_resume_after_interrupt_between_stages(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    original = Quantize.run
    fail_int4_stage(monkeypatch, KeyboardInterrupt())  # Ctrl-C during stage 2
    with pytest.raises(KeyboardInterrupt):
        apply(recipe(), out)
    first = out / "stages" / "01-quantize"
    assert (first / "knowpress_stage.json").is_file() and (first / "eval.json").is_file()
    assert not (out / "stages" / "02-quantize").exists()
    assert not list((out / "stages").glob(".tmp-*"))  # nothing half-written
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(Quantize, "run", original)
    report = apply(recipe(), out, resume=True).report
    assert [s["resumed"] for s in report["stages"]] == [True, False]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    # Changing stage 2 re-runs only stage 2; changing stage 1 re-runs both.
    changed = recipe(
        stages=[
            {"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}},
            {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 64}},
        ]
    )
    report = apply(changed, out, resume=True).report
    assert [s["resumed"] for s in report["stages"]] == [True, False]
    changed_first = recipe(
        stages=[
            {"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 64}},
            {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 64}},
        ]
    )
    report = apply(changed_first, out, resume=True).report
    assert [s["resumed"] for s in report["stages"]] == [False, False]


def test_crash_in_stage_keeps_finished_stages(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    fail_int4_stage(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        apply(recipe(), out)
    first = out / "stages" / "01-quantize"
    record = json.loads((first / "knowpress_stage.json").read_text())
    weights = (first / "model.safetensors").stat().st_size
    assert record["kind"] == "quantize" and record["bytes_after"] == weights
    assert not (out / "stages" / "02-quantize").exists()


def test_stage_error_names_the_stage(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    bad = recipe(stages=[{**recipe().dump()["stages"][0], "targets": ["*.dwn_proj"]}])
    with pytest.raises(
        KnowpressError,
        match=r"stages\.0 \(quantize\): quantize\.targets: '\*\.dwn_proj' matches no",
    ):
        apply(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_group_size_that_does_not_divide_falls_back_and_says_so(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    plan = {"rules": [{"match": "*.down_proj", "group_size": 48}]}  # in_features 512 there
    stages = [{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 96},
               "plan": plan}]  # fmt: skip
    report = apply(recipe(stages=stages), tmp_path / "out").report
    fallbacks = report["stages"][0]["details"]["group_fallbacks"]
    assert fallbacks["model.layers.0.self_attn.q_proj.weight"] == (
        "group_size 96 does not divide 128: group 64"
    )
    assert fallbacks["model.layers.0.mlp.down_proj.weight"].endswith("group 32")


def test_resume_and_force_conflict(tmp_path: Path) -> None:
    with pytest.raises(KnowpressError, match="contradict"):
        apply(recipe(), tmp_path, resume=True, force=True)


POLICY_STAGE = {"kind": "attach_test_policy", "payload_bytes": 5000}


def test_policy_stage_is_saved_resumed_and_scored_through_load_runtime(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knowpress.methods.kv.full import FullCache
    from knowpress.testing.stages import PAYLOAD_FILE

    caches: list[int] = []
    make_cache = FullCache.make_cache

    def counting(self: FullCache, model: Any) -> Any:
        caches.append(1)
        return make_cache(self, model)

    monkeypatch.setattr(FullCache, "make_cache", counting)
    stages = [POLICY_STAGE, recipe().dump()["stages"][0]]  # policy, then int8 on top of it
    out = tmp_path / "out"
    report = apply(recipe(stages=stages), out).report
    first, second = out / "stages" / "01-attach_test_policy", out / "stages" / "02-quantize"
    manifest = read_manifest(first)
    assert manifest is not None and manifest.runtime == {"kv_policy": {"name": "full"}}
    assert manifest.artifacts == {"policy_table": PAYLOAD_FILE}
    weights = (first / "model.safetensors").stat().st_size
    assert manifest.stored_bytes == weights + 5000  # the non-HF file is counted
    assert report["rows"][1]["stored_bytes"] == weights + 5000
    assert read_manifest(second).runtime == {"kv_policy": {"name": "full"}}  # carried forward
    assert [row["runtime"]["kv_policy"] for row in report["rows"]] == [None, "full", "full"]
    assert caches, "the policy's cache was never used by evaluation"

    caches.clear()
    (second / "eval.json").unlink()  # resume: stage 2 is re-scored from disk, with the policy
    resumed = apply(recipe(stages=stages), out, resume=True).report
    assert [s["resumed"] for s in resumed["stages"]] == [True, True]
    assert resumed["rows"][2]["runtime"]["kv_policy"] == "full" and caches
    assert resumed["rows"][2]["scores"] == report["rows"][2]["scores"]

    (first / PAYLOAD_FILE).write_bytes(b"truncated")  # resume verifies what it reuses
    again = apply(recipe(stages=stages), out, resume=True).report
    assert [s["resumed"] for s in again["stages"]] == [False, False]
    assert (first / PAYLOAD_FILE).stat().st_size == 5000


def test_teacher_and_data_are_part_of_a_stage_hash(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = recipe(stages=[recipe().dump()["stages"][0]])
    apply(base, out)

    def resumed(**changes: Any) -> list[bool]:
        changed = recipe(stages=[recipe().dump()["stages"][0]], **changes)
        return [s["resumed"] for s in apply(changed, out, resume=True).report["stages"]]

    assert resumed() == [True]
    assert resumed(data={"calibration": {"samples": 7}}) == [False]
    other_teacher = {"path": str(tiny_teacher_dir), "compute_dtype": "bfloat16"}
    assert resumed(data={"calibration": {"samples": 7}}, teacher=other_teacher) == [False]
    # the reference only changes what retention is measured against: the stage is reused
    reference = {"path": str(tiny_teacher_dir)}
    kept = apply(recipe(stages=[recipe().dump()["stages"][0]], data={"calibration": {
        "samples": 7}}, teacher=other_teacher, reference=reference), out, resume=True)  # fmt: skip
    assert [s["resumed"] for s in kept.report["stages"]] == [True]
    assert kept.report["inputs"]["reference"] == str(tiny_teacher_dir)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(KnowpressError, match=r"^device: 'cuda' asked for, but this torch sees "
                       r"no CUDA GPU .*; use device cpu or auto$"):  # fmt: skip
        apply(recipe(device="cuda"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
