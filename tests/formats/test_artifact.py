"""Artifact manifests, deploy-dtype saves and size accounting: what is stored is what is counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.formats.manifest import (
    build_manifest,
    changed_files,
    read_manifest,
    stored_bytes,
    write_manifest,
)
from knowpress.formats.sizes import bf16_bytes
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _dtypes(folder: Path) -> dict[str, torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


def _quantized(method: RTN) -> torch.nn.Module:
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    method.apply(model, select(model, None, ["lm_head"]), None, Progress(False))  # type: ignore[arg-type]
    return model


def test_deploy_dtype_save_keeps_ties_packing_and_the_model_in_memory(tmp_path: Path) -> None:
    model = _quantized(RTN(name="rtn", bits=4, group_size=32))
    save_model(model, tiny_tokenizer(), tmp_path / "q", dtype=torch.bfloat16)
    dtypes = _dtypes(tmp_path / "q")
    assert "lm_head.weight" not in dtypes  # tied to the embedding: stored once
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    packed = "model.layers.0.mlp.up_proj"
    assert dtypes[f"{packed}.weight_packed"] == "U8" and dtypes[f"{packed}.weight_scale"] == "F16"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.model.embed_tokens.weight.dtype == torch.float32  # compute copy untouched
    reloaded, _ = load_model(tmp_path / "q")
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32  # upcast for compute
    stored = model.model.embed_tokens.weight.bfloat16().float()
    assert torch.equal(reloaded.model.embed_tokens.weight, stored)


@pytest.mark.parametrize(
    "method",
    [
        RTN(name="rtn", bits=4, group_size=32),
        RTN(name="rtn", bits=8, group_size=64, symmetric=True),
        RTN(name="rtn", bits=4, group_size=None),
    ],
    ids=["int4-g32", "int8-g64-sym", "int4-row"],
)
def test_stored_bytes_match_the_plan_within_1_percent(method: RTN, tmp_path: Path) -> None:
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    targets = select(model, None, ["lm_head"])
    predicted = predicted_bytes(model, resolve(method, None, targets), "bfloat16")
    method.apply(model, targets, None, Progress(False))  # type: ignore[arg-type]
    save_model(model, tiny_tokenizer(), tmp_path, dtype=torch.bfloat16)
    stored = (tmp_path / "model.safetensors").stat().st_size
    assert abs(predicted - stored) <= 0.01 * stored, (predicted, stored)


def test_bf16_bytes_of_an_fp32_folder_is_its_bf16_save(tmp_path: Path) -> None:
    model = tiny_llama()
    save_model(model, tiny_tokenizer(), tmp_path / "fp32")
    save_model(model, tiny_tokenizer(), tmp_path / "bf16", dtype=torch.bfloat16)
    real = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert abs(bf16_bytes(tmp_path / "fp32") - real) <= 16  # the header's offsets may differ
    assert bf16_bytes(tmp_path / "bf16") == pytest.approx(real, abs=16)


def test_manifest_counts_payload_not_metadata_and_sees_changes(tmp_path: Path) -> None:
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path)
    (tmp_path / "table.bin").write_bytes(bytes(300))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.onnx_data").write_bytes(bytes(200))
    manifest = build_manifest(tmp_path, format="hf", dtype="float32",
                              artifacts={"table": "table.bin"})  # fmt: skip
    weights = (tmp_path / "model.safetensors").stat().st_size
    assert manifest.files == {"model.safetensors": weights, "sub/model.onnx_data": 200,
                              "table.bin": 300}  # fmt: skip
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(manifest.metadata)
    assert manifest.stored_bytes == weights + 500
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest and stored_bytes(tmp_path) == weights + 500
    (tmp_path / "table.bin").write_bytes(bytes(10))
    assert changed_files(tmp_path, manifest) == ["table.bin has 10 bytes, 300 were written"]
    with pytest.raises(KnowpressError, match=r"table\.bin has 10 bytes.*re-run its stage"):
        stored_bytes(tmp_path)
    with pytest.raises(KnowpressError, match=r"artifact 'x': nope\.bin is not in the stage folder"):
        build_manifest(tmp_path, format="hf", dtype="float32", artifacts={"x": "nope.bin"})


def test_stock_transformers_refuses_a_packed_folder_naming_knowpress(tmp_path: Path) -> None:
    model = _quantized(RTN(name="rtn", bits=4, group_size=32))
    save_model(model, tiny_tokenizer(), tmp_path, dtype=torch.bfloat16)
    code = (
        "import sys; from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'knowpress' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "ValueError" in run.stderr
    assert "stock transformers cannot read these packed weights" in run.stderr
    assert "knowpress.formats.load_model(DIR)" in run.stderr
    reloaded, _ = load_model(tmp_path)  # knowpress's loader reads it
    assert reloaded.config.model_type == "llama"


def test_packed_load_fails_loudly_on_a_missing_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_llama(hidden_size=128, intermediate_size=256)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    RTN(name="rtn", bits=8, group_size=32).apply(model, select(model, None, ["lm_head"]), None,
                                                 Progress(False))  # type: ignore[arg-type]  # fmt: skip
    save_model(model, tiny_tokenizer(), tmp_path)
    assert load_model(tmp_path)[0] is not None
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]  # an untied head must not be initialised at random
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KnowpressError, match=r"does not match its config \(missing \['lm_head"):
        load_model(tmp_path)


def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(KnowpressError, match=r"no tokenizer files .*tokenizer\.save_pretrained"):
        load_model(tmp_path)


REMOTE_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_packed_folder_of_a_remote_code_model_honours_trust_remote_code(tmp_path: Path) -> None:
    source = tmp_path / "custom"
    source.mkdir()
    (source / "modeling_tiny.py").write_text(REMOTE_CODE)
    base = tiny_llama()
    base.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    config |= {"model_type": "tiny_custom", "auto_map": {
        "AutoConfig": "modeling_tiny.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}}  # fmt: skip
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(KnowpressError, match="could not load model"):
        load_model(source)  # custom code is not run unless asked
    model, tokenizer = load_model(source, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    RTN(name="rtn", bits=4, group_size=32).apply(model, select(model, None, ["lm_head"]), None,
                                                 Progress(False))  # type: ignore[arg-type]  # fmt: skip
    save_model(model, tokenizer, tmp_path / "packed", dtype=torch.bfloat16)
    with pytest.raises(KnowpressError, match=r"set model\.trust_remote_code: true"):
        load_model(tmp_path / "packed")
    reloaded, _ = load_model(tmp_path / "packed", trust_remote_code=True)
    assert type(reloaded).__name__ == "TinyCustomForCausalLM"
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=0.05)


def test_a_packed_folder_says_why_no_public_format_holds_it(tmp_path: Path) -> None:
    """knowpress's format only for what compressed-tensors cannot hold, the case named."""
    from knowpress.formats.compressed_tensors import FORMAT
    from knowpress.formats.io import format_reason
    from knowpress.formats.weights import packed_modules
    from knowpress.testing.models import tiny_moe

    assert format_reason(tiny_llama()) is None  # a plain hf folder
    model = tiny_llama()
    RTN(name="rtn", bits=4, group_size=32, symmetric=False).apply(
        model, select(model, None, ["lm_head"]), None, Progress(False))  # type: ignore[arg-type]  # fmt: skip
    assert format_reason(model) == (
        "the quantize stage stored its codes in knowpress's format (format: knowpress)"
    )  # compressed-tensors could hold it: the stage chose knowpress's format
    model = tiny_moe("mixtral")
    RTN(name="rtn", bits=4, group_size=16, symmetric=False).apply(
        model, select(model, None, ["lm_head"]), None, Progress(False))  # type: ignore[arg-type]  # fmt: skip
    assert "transformers#47430" in (format_reason(model) or "")
    for module in packed_modules(model).values():
        module.storage = FORMAT
    with pytest.raises(KnowpressError, match=r"compressed-tensors: .* zero points.*#47430"):
        save_model(model, tiny_tokenizer(64), tmp_path / "ct")  # asked for, not packed silently
