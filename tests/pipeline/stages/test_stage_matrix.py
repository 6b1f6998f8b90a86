"""Every registered stage kind, run by the runner on the tiny teacher: the stage contract.

Each row of ``default_entries.STAGES`` must produce a folder with a manifest whose payload
files are exactly what its bytes count, be scored through ``load_runtime``, and resume.
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
            "stages": [stage],
            "evaluate": {"tasks": ["recall", "perplexity"], "max_items": 8},
        }
    )


@pytest.mark.parametrize("kind", sorted(rows.STAGES))
def test_stage_kind_honours_the_contract(kind: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = apply(_recipe(rows.STAGES[kind]), out).report
    folder = out / "stages" / f"01-{kind}"
    manifest = read_manifest(folder)
    assert manifest is not None
    payload = {
        p.name: p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not is_metadata(p.name) and p.name != "knowpress_artifact.json"
    }
    assert manifest.files == payload and manifest.stored_bytes == sum(payload.values())
    row = report["rows"][1]
    assert row["stored_bytes"] == report["stages"][0]["bytes_after"] == manifest.stored_bytes
    assert row["runtime"]["kv_policy"] == (manifest.runtime.get("kv_policy") or {}).get("name")
    resumed = apply(_recipe(rows.STAGES[kind]), out, resume=True).report
    assert resumed["stages"][0]["resumed"] is True
    assert resumed["rows"][1]["scores"] == row["scores"]
    assert load_report(out)["rows"][1]["stored_bytes"] == manifest.stored_bytes
