"""load_runtime: the runtime an artifact asks for, its policies, and the runtime contract."""

from __future__ import annotations

import json
from pathlib import Path

import default_entries as rows
import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats import detect
from knowpress.formats.base import detect_folder
from knowpress.formats.io import save_model
from knowpress.formats.manifest import MANIFEST_FILE, build_manifest, write_manifest
from knowpress.methods.kv import policy_from_json
from knowpress.methods.kv.full import FullCache
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.runtimes.loader import load_runtime
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama, tiny_tokenizer

PROMPTS = ["w1 w2 w3", "w7 w9"]


def _folder(kind: str, path: Path) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama()
    if kind == "onnx":  # the export stage's folder, scored by onnxruntime
        from knowpress.testing.export import export_folder

        export_folder(tiny_llama(), tiny_tokenizer(), path)
        return path, model
    if kind == "gguf":  # int4 codes carried into Q4_0, the embedding quantized; scored in torch
        from knowpress.testing.export import gguf_folder

        targets = select(model, None, ["lm_head"])
        RTN(name="rtn", bits=4, group_size=32).apply(model, targets, None, Progress(False))  # type: ignore[arg-type]
        gguf_folder(model, tiny_tokenizer(), path, weights="q4_0")
        return path, model  # now holding the weights the file stores
    if kind in ("packed", "compressed-tensors"):
        targets = select(model, None, ["lm_head"])
        RTN(name="rtn", bits=4, group_size=32).apply(model, targets, None, Progress(False))  # type: ignore[arg-type]
    if kind == "compressed-tensors":  # what the quantize stage's format: auto picks
        from knowpress.formats.compressed_tensors import FORMAT
        from knowpress.formats.weights import packed_modules

        for module in packed_modules(model).values():
            module.storage = FORMAT
    fmt = save_model(model, tiny_tokenizer(), path)
    write_manifest(path, build_manifest(path, format=fmt, dtype="float32"))
    return path, model


@pytest.mark.parametrize("fmt", sorted(rows.FORMATS))
def test_each_format_loads_the_runtime_that_scores_it_as_stored(fmt: str, tmp_path: Path) -> None:
    folder, model = _folder(rows.FORMATS[fmt], tmp_path / fmt)
    runtime = load_runtime(folder)
    assert runtime.name == {"onnx": "onnxruntime", "gguf": "torch-gguf"}.get(fmt, "torch")
    assert detect(folder)[0].name == fmt  # from its manifest
    (folder / MANIFEST_FILE).unlink()
    assert detect_folder(folder).name == fmt  # and from its files alone
    assert runtime.kv_policy is None
    expected = TorchRuntime(model, tiny_tokenizer()).greedy(PROMPTS, max_new_tokens=4)
    assert runtime.greedy(PROMPTS, max_new_tokens=4) == expected
    assert runtime.parameter_count() == TorchRuntime(model, tiny_tokenizer()).parameter_count()


def test_runtime_answers_what_tasks_ask(tmp_path: Path) -> None:
    runtime = TorchRuntime(tiny_llama(layers=2), tiny_tokenizer())
    assert runtime.max_positions == 128
    # q, o [64, 64]; k, v [32, 64] (2 KV heads); MLP 3 x [128, 64]; two norms
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64
    # embedding (the tied head counted once) + 2 layers + final norm
    assert runtime.parameter_count() == 128 * 64 + 2 * per_layer + 64
    # full cache, fp32: K and V x 2 layers x 2 KV heads x head_dim 16 x 4 bytes
    assert runtime.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    assert runtime.describe() == {
        "runtime": "torch", "device": "cpu", "dtype": "float32", "kv_policy": None,
        "kv_dtype": "float32",
    }  # fmt: skip
    # computed in float32, deployed in bfloat16: the cache is counted at 2 bytes a value
    deployed = TorchRuntime(tiny_llama(layers=2), tiny_tokenizer(), kv_dtype="bfloat16")
    assert deployed.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2
    assert deployed.describe()["kv_dtype"] == "bfloat16"


def test_a_folder_without_manifest_counts_its_cache_in_the_deploy_dtype(tmp_path: Path) -> None:
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert load_runtime(tmp_path / "m").kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2  # bf16
    wide = load_runtime(tmp_path / "m", deploy_dtype="float32")
    assert wide.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4


def _with_runtime(folder: Path, runtime: dict[str, object]) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["runtime"] = runtime
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def test_manifest_policies_are_applied_and_unknown_ones_refused(tmp_path: Path) -> None:
    folder, _ = _folder("plain", tmp_path / "m")
    _with_runtime(folder, {"kv_policy": {"name": "full"}})
    runtime = load_runtime(folder)
    assert isinstance(runtime, TorchRuntime) and runtime.kv_policy == FullCache(name="full")
    assert runtime.describe()["kv_policy"] == "full"
    saved = {"name": "compose", "policies": [{"name": "snapkv", "budget": 0.25},
                                              {"name": "kivi", "bits": 2}]}  # fmt: skip
    _with_runtime(folder, {"kv_policy": saved})
    restored = load_runtime(folder).kv_policy
    assert restored is not None and restored.model_dump() == policy_from_json(
        saved, "t").model_dump()  # fmt: skip
    _with_runtime(folder, {"kv_policy": {"name": "quest"}})
    with pytest.raises(KnowpressError, match=r"runtime\.kv_policy: unknown KV-cache policy"):
        load_runtime(folder)
    _with_runtime(folder, {"expert_skipping": {"beta": 0.5}})
    with pytest.raises(KnowpressError, match="'expert_skipping' is unknown to this knowpress"):
        load_runtime(folder)


def test_unknown_format_and_structure_are_refused(tmp_path: Path) -> None:
    folder, _ = _folder("plain", tmp_path / "m")
    data = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**data, "format": "tflite"}))
    with pytest.raises(KnowpressError, match="unknown artifact format 'tflite'"):
        load_runtime(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({**data, "structure": {"experts": [3, 2]}}))
    with pytest.raises(KnowpressError, match=r"structure \['experts'\] needs a loader"):
        load_runtime(folder)
    (folder / MANIFEST_FILE).write_text("{}")
    with pytest.raises(KnowpressError, match="not a valid artifact manifest"):
        load_runtime(folder)
