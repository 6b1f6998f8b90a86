"""Sharded safetensors folders (``formats/shards.py``): every torch format writes shards and
``model.safetensors.index.json`` past ``max_shard_size`` and reads them back exactly, one
shard at a time; sizes, manifests and checks count every shard and the index; a missing or
misplaced shard is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ct_stock import quantized

from knowpress.core.errors import KnowpressError, RecipeError
from knowpress.formats.io import load_model, save_model
from knowpress.formats.manifest import build_manifest, changed_files, stored_bytes
from knowpress.formats.shards import INDEX_FILE, LazyTensors, folder_header, weight_bytes
from knowpress.formats.sizes import bf16_bytes, one_file_bytes, read_header
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.pipeline.integrity import check_folder, expected_entries
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.testing.models import tiny_llama, tiny_moe, tiny_tokenizer

INT4 = {"name": "rtn", "bits": 4, "group_size": 32}
SHARD = 20_000  # bytes: every case below needs 3 or more shards


def _llama() -> torch.nn.Module:
    return tiny_llama(hidden_size=128, intermediate_size=256)


def _mixtral(storage: str) -> torch.nn.Module:
    return quantized(tiny_moe("mixtral"), {**INT4, "group_size": 16}, storage)


#: name -> (model builder, vocabulary, the format save_model picks)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], int, str]] = {
    "hf": (_llama, 128, "hf"),
    "packed-int4": (lambda: quantized(_llama(), INT4, "knowpress"), 128, "hf-packed"),
    "ct-int4": (lambda: quantized(_llama(), INT4), 128, "hf-compressed-tensors"),
    "packed-mixtral": (lambda: _mixtral("knowpress"), 64, "hf-packed"),
    "ct-mixtral": (lambda: _mixtral("compressed-tensors"), 64, "hf-compressed-tensors"),
}


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))


def _limit(case: str) -> int:
    return SHARD // 5 if "mixtral" in case else SHARD  # the tiny MoE is smaller


def _saved(case: str, folder: Path) -> tuple[torch.nn.Module, str]:
    build, vocab, _ = CASES[case]
    model = build()
    return model, save_model(model, tiny_tokenizer(vocab), folder, max_shard_size=_limit(case))


@pytest.mark.parametrize("case", list(CASES))
def test_a_sharded_save_round_trips_exactly(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.startswith("ct"):
        pytest.importorskip("compressed_tensors")
    model, fmt = _saved(case, tmp_path)
    assert fmt == CASES[case][2]
    shards = _shards(tmp_path)
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(index.values())) == shards
    for header in (read_header(tmp_path / s) for s in shards):  # tensor bytes; over: one tensor
        data = max(v["data_offsets"][1] for v in header.values())
        assert data <= _limit(case) or len(header) == 1
    import safetensors.torch

    def no_whole_file(*_: object, **__: object) -> None:
        raise AssertionError("a shard was read whole into one dict (use safe_open)")

    monkeypatch.setattr(safetensors.torch, "load_file", no_whole_file)
    reloaded, _ = load_model(tmp_path)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert sorted(ours) == sorted(theirs)  # codes, scales and zero points included
    packed = [k for k in ours if k.endswith(("_packed", "_scale"))]
    assert bool(packed) == (case != "hf")
    for key, tensor in ours.items():
        assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), key
    again = tmp_path / "again"  # a later stage re-saves the reloaded model: the same tensors
    tokenizer = tiny_tokenizer(CASES[case][1])
    assert save_model(reloaded, tokenizer, again, max_shard_size=_limit(case)) == fmt
    assert len(_shards(again)) == len(shards) and _stored(again) == _stored(tmp_path)


def _stored(folder: Path) -> dict[str, bytes]:
    with LazyTensors(folder) as lazy:
        return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in lazy.items()}


def test_every_shard_and_the_index_are_the_stored_bytes(tmp_path: Path) -> None:
    _saved("packed-int4", tmp_path)
    files = [*_shards(tmp_path), INDEX_FILE]
    total = sum((tmp_path / f).stat().st_size for f in files)
    assert weight_bytes(tmp_path) == total == stored_bytes(tmp_path)  # no manifest yet
    manifest = build_manifest(tmp_path, format="hf-packed", dtype="float32")
    assert sorted(manifest.files) == sorted(files) and set(manifest.sha256) == set(files)
    assert manifest.stored_bytes == total
    assert "config.json" in manifest.metadata and "knowpress_quant.json" in manifest.metadata
    missing = _shards(tmp_path)[1]
    (tmp_path / missing).unlink()
    assert changed_files(tmp_path, manifest) == [f"{missing} is missing"]


def test_bf16_bytes_count_every_shard_and_the_index(tmp_path: Path) -> None:
    model = _llama()
    save_model(model, tiny_tokenizer(), tmp_path / "fp32", max_shard_size=2 * SHARD)
    save_model(model, tiny_tokenizer(), tmp_path / "bf16", dtype=torch.bfloat16,
               max_shard_size=SHARD)  # fmt: skip  # half the bytes: the same split
    bf16 = tmp_path / "bf16"
    assert len(_shards(bf16)) == len(_shards(tmp_path / "fp32")) >= 3
    real = weight_bytes(bf16)
    assert abs(bf16_bytes(tmp_path / "fp32") - real) <= 16 * (len(_shards(bf16)) + 1)
    assert bf16_bytes(bf16) == real


def test_a_missing_or_misplaced_shard_is_one_line(tmp_path: Path) -> None:
    _saved("hf", tmp_path)
    index_path = tmp_path / INDEX_FILE
    text = index_path.read_text()
    data = json.loads(text)
    name, shard = next(iter(sorted(data["weight_map"].items())))
    other = next(s for s in _shards(tmp_path) if s != shard)
    data["weight_map"][name] = other
    index_path.write_text(json.dumps(data))
    with pytest.raises(KnowpressError, match=rf"{name} should be in {other}, which does not hold"):
        load_model(tmp_path)
    index_path.write_text("[1, 2]")
    with pytest.raises(KnowpressError, match=r"not a safetensors index"):
        load_model(tmp_path)
    index_path.write_text(text)
    assert load_model(tmp_path)[0] is not None
    (tmp_path / shard).unlink()
    with pytest.raises(KnowpressError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message and f"shard {shard} named in {INDEX_FILE} is missing" in message
    assert "rerun with --resume" in message


def test_lazy_tensors_read_each_tensor_from_its_shard(tmp_path: Path) -> None:
    model, _ = _saved("hf", tmp_path)
    header = folder_header(tmp_path)
    with LazyTensors(tmp_path) as lazy:
        assert sorted(lazy) == sorted(header) and len(lazy) == len(header)
        assert torch.equal(lazy["model.norm.weight"], model.model.norm.weight)
        assert "model.nope" not in lazy and lazy.get("model.nope") is None


@pytest.mark.parametrize("storage", ["knowpress", "compressed-tensors"])
def test_the_integrity_check_reads_every_shard(storage: str, tmp_path: Path) -> None:
    if storage == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    method = RTN(name="rtn", bits=4, group_size=32)
    model = _llama()
    assignments = resolve(method, None, select(model, None, ["lm_head"]))
    predicted = predicted_bytes(model, assignments, "bfloat16", storage)
    model = quantized(model, INT4, storage)
    save_model(model, tiny_tokenizer(), tmp_path, dtype=torch.bfloat16, max_shard_size=SHARD)
    assert len(_shards(tmp_path)) >= 3
    assert abs(one_file_bytes(tmp_path) - predicted) <= 0.01 * predicted
    assert weight_bytes(tmp_path) > one_file_bytes(tmp_path)  # each shard's header, the index
    check_folder(assignments, tmp_path, predicted, storage)
    where = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    codes = {where[expected_entries(a, storage)[0][0]] for a in assignments}
    assert len(codes) >= 2  # the targets' codes are looked up across shards
    (tmp_path / _shards(tmp_path)[-1]).unlink()
    with pytest.raises(KnowpressError, match=r"is missing \(1 of \d+ shards\)"):
        check_folder(assignments, tmp_path, predicted, storage)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), (1234, 1234),
     ("0.5 gb", 5 * 10**8)],
)  # fmt: skip
def test_max_shard_size_takes_bytes_or_a_size_string(value: Any, expected: int) -> None:
    recipe = validate_recipe({"version": 1, "model": {"path": "m", "max_shard_size": value}})
    assert recipe.model.max_shard_size == expected
    default = validate_recipe({"version": 1, "model": {"path": "m"}})
    assert default.model.max_shard_size == 5 * 10**9


@pytest.mark.parametrize("value", ["5XB", "lots", -3, 0, True, 4.5, [1]])
def test_a_bad_max_shard_size_is_one_line(value: Any) -> None:
    with pytest.raises(RecipeError) as info:
        validate_recipe({"version": 1, "model": {"path": "m", "max_shard_size": value}})
    assert len(info.value.lines) == 1
    line = info.value.lines[0]
    assert line.startswith("model.max_shard_size: ") and ("'5GB'" in line), line
