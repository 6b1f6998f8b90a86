"""The runner end to end on the tiny fact world: checkpoints, report, resume, atomicity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from knowpress.errors import KnowpressError
from knowpress.recipe import Recipe, validate_recipe
from knowpress.report import REQUIRED_KEYS, load_report
from knowpress.runner import apply
from knowpress.stages.quantize import Quantize


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


@pytest.fixture(scope="module")
def finished_run(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    apply(recipe(), out)
    return out


def test_layout_and_report_schema(finished_run: Path) -> None:
    out = finished_run
    for name in ("report.json", "report.md", "retention_vs_size.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    report = load_report(out / "report.json")
    assert all(key in report for key in REQUIRED_KEYS)
    assert report["schema_version"] == 1
    assert [row["name"] for row in report["rows"]] == ["teacher", "01-quantize", "02-quantize"]
    teacher = report["rows"][0]
    assert teacher["scores"]["recall"] >= 0.9  # the test teacher knows its facts
    assert teacher["retention"] == {"recall": 1.0, "perplexity": 1.0}
    for stage in ("01-quantize", "02-quantize"):
        folder = out / "stages" / stage
        assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
        assert (folder / "knowpress_stage.json").is_file() and (folder / "eval.json").is_file()
    assert not list((out / "stages").glob(".tmp-*"))


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
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 0 for s in stages)


def test_retention_is_ratio_to_teacher(finished_run: Path) -> None:
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
    record = json.loads((out / "stages" / "01-quantize" / "knowpress_stage.json").read_text())
    assert record["kind"] == "quantize" and record["bytes_after"] > 0


def test_stage_error_names_the_stage(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    bad = recipe(
        stages=[{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 96}}]
    )
    with pytest.raises(
        KnowpressError,
        match=r"stages\.0 \(quantize\): quantize\.method: "
        r"group_size 96 does not divide",
    ):
        apply(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "stages" / "01-quantize").exists()


def test_resume_and_force_conflict(tmp_path: Path) -> None:
    with pytest.raises(KnowpressError, match="contradict"):
        apply(recipe(), tmp_path, resume=True, force=True)
