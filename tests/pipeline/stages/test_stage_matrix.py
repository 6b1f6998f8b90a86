"""Every registered stage kind, run by the runner on the tiny teacher: the stage contract.

Each row of ``default_entries.STAGES`` (after the stages ``STAGE_INPUTS`` names for it) must
produce a folder with a manifest whose payload files are exactly what its bytes count, be
scored through ``load_runtime``, and resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import default_entries as rows
import pytest

from knowpress.formats.manifest import is_metadata, read_manifest
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.report import load_report
from knowpress.pipeline.runner import apply


def _recipe(stage: dict[str, Any]) -> Any:
    return validate_recipe(
        {
            "version": 1,
            "model": {"world": rows.STAGE_MODELS.get(stage["kind"], "test-tiny")},
            "stages": [*rows.STAGE_INPUTS.get(stage["kind"], []), stage],
            "evaluate": {"tasks": ["recall", "perplexity"], "max_items": 8},
        }
    )


@pytest.mark.parametrize("kind", sorted(rows.STAGES))
def test_stage_kind_honours_the_contract(kind: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = apply(_recipe(rows.STAGES[kind]), out).report
    last = len(rows.STAGE_INPUTS.get(kind, []))  # the stage's index, after its inputs
    folder = out / "stages" / f"{last + 1:02d}-{kind}"
    manifest = read_manifest(folder)
    assert manifest is not None
    payload = {
        p.name: p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not is_metadata(p.name) and p.name != "knowpress_artifact.json"
    }
    assert manifest.files == payload and manifest.stored_bytes == sum(payload.values())
    row = report["rows"][last + 1]
    assert row["stored_bytes"] == report["stages"][last]["bytes_after"] == manifest.stored_bytes
    assert row["runtime"]["kv_policy"] == (manifest.runtime.get("kv_policy") or {}).get("name")
    resumed = apply(_recipe(rows.STAGES[kind]), out, resume=True).report
    assert resumed["stages"][last]["resumed"] is True
    assert resumed["rows"][last + 1]["scores"] == row["scores"]
    assert load_report(out)["rows"][last + 1]["stored_bytes"] == manifest.stored_bytes
