"""A run whose stages are stored in shards (``model.max_shard_size``): the report's stored
bytes are every shard and the index, a GGUF export reads the sharded folder (in the run and
through ``compress export``), and a missing shard makes ``--resume`` re-run its stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowpress.cli.app import main
from knowpress.formats.manifest import read_manifest
from knowpress.formats.shards import INDEX_FILE
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply

pytest.importorskip("gguf")


def _recipe(shard: str) -> dict:  # type: ignore[type-arg]
    stages = [{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}},
              {"kind": "export", "format": "gguf"}]  # fmt: skip
    return {"version": 1, "model": {"world": "test-tiny", "max_shard_size": shard},
            "stages": stages, "evaluate": {"tasks": ["kl"], "max_items": 4}}  # fmt: skip


def test_a_sharded_run_counts_every_shard_exports_them_and_resumes(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = apply(validate_recipe(_recipe("20KB")), out).report
    folder = out / "stages" / "01-quantize"
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(index.values())) == shards
    manifest = read_manifest(folder)
    assert manifest is not None and sorted(manifest.files) == sorted([*shards, INDEX_FILE])
    total = sum((folder / f).stat().st_size for f in [*shards, INDEX_FILE])
    assert report["rows"][1]["stored_bytes"] == total == report["stages"][0]["bytes_after"]
    assert report["stages"][1]["details"]["parity_greedy_equal"] is True  # read from shards
    assert report["stages"][1]["bytes_before"] == total
    bundle = tmp_path / "bundle"  # compress export on the sharded stage folder
    assert main(["export", str(folder), "-o", str(bundle), "--format", "gguf", "-q"]) == 0
    gguf = (out / "stages" / "02-export" / "model.gguf").read_bytes()
    assert (bundle / "model.gguf").read_bytes() == gguf

    resumed = apply(validate_recipe(_recipe("20KB")), out, resume=True).report
    assert [s["resumed"] for s in resumed["stages"]] == [True, True]
    (folder / shards[1]).unlink()  # the resume check sees a missing shard: the stage re-runs
    again = apply(validate_recipe(_recipe("20KB")), out, resume=True).report
    assert [s["resumed"] for s in again["stages"]] == [False, False]
    assert (folder / shards[1]).is_file() and again["rows"][1]["stored_bytes"] == total
    bigger = apply(validate_recipe(_recipe("5GB")), out, resume=True).report  # other shards
    assert [s["resumed"] for s in bigger["stages"]] == [False, False]
    assert (folder / "model.safetensors").is_file() and not (folder / INDEX_FILE).exists()
    assert bigger["rows"][1]["stored_bytes"] < total  # one header, no index
