"""compressed-tensors folders: stock transformers loads them with no knowpress import and
computes what knowpress computes; knowpress reads them back packed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.models import tiny_llama, tiny_tokenizer

pytest.importorskip("compressed_tensors")
IDS = [[1, 5, 9, 30, 7, 3, 8]]
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
assert "knowpress" not in sys.modules
print(json.dumps({"logits": logits.flatten().tolist(), "tokens": tokens.tolist()}))
"""


def _quantized(method: RTN, storage: str) -> torch.nn.Module:
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    method.apply(model, select(model, None, ["lm_head"]), None, Progress(False))  # type: ignore[arg-type]
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.storage = storage
    return model


# g128 is per-row on the 128-wide q_proj, grouped on the 256-wide down_proj: two config groups
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 64), (3, 32), (4, None), (4, 128)])
def test_stock_transformers_loads_it_and_computes_the_same(
    bits: int, group: int | None, tmp_path: Path
) -> None:
    method = RTN(name="rtn", bits=bits, group_size=group, symmetric=True)
    model = _quantized(method, "compressed-tensors")
    assert save_model(model, tiny_tokenizer(), tmp_path) == "hf-compressed-tensors"
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    run = subprocess.run([sys.executable, "-c", STOCK, str(tmp_path), json.dumps(IDS)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    stock = json.loads(run.stdout.strip().splitlines()[-1])
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ours = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.allclose(torch.tensor(stock["logits"]).reshape(ours.shape), ours, atol=1e-5)
    assert stock["tokens"] == tokens.tolist()
    reloaded, _ = load_model(tmp_path)  # knowpress reads the codes back, packed
    packed = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14 and all(m.storage == "compressed-tensors" for m in packed)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours)
    again = tmp_path / "again"  # a later stage saves the reloaded model: the same tensors
    assert save_model(reloaded, tiny_tokenizer(), again) == "hf-compressed-tensors"
    assert _tensors(again) == _tensors(tmp_path)


def _tensors(folder: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in state.items()}


def test_bytes_match_the_prediction_in_the_compressed_tensors_layout(tmp_path: Path) -> None:
    method = RTN(name="rtn", bits=3, group_size=32, symmetric=True)
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    assignments = resolve(method, None, select(model, None, ["lm_head"]))
    predicted = predicted_bytes(model, assignments, "bfloat16", "compressed-tensors")
    model = _quantized(method, "compressed-tensors")
    save_model(model, tiny_tokenizer(), tmp_path, dtype=torch.bfloat16)
    stored = (tmp_path / "model.safetensors").stat().st_size
    assert abs(stored - predicted) <= 0.01 * stored


def _stage(**method: object) -> Any:
    from knowpress.pipeline.stages.quantize import QuantizeConfig

    base = {} if "dtype" in method else {"bits": 4, "group_size": 32}
    block = {"kind": "quantize", "method": {"name": "rtn", **base, **method}}
    recipe = validate_recipe({"version": 1, "model": {"path": "./x"}, "stages": [block]})
    stage = recipe.stages[0]
    assert isinstance(stage, QuantizeConfig)
    return stage


def test_the_stage_chooses_the_format_and_says_why_not() -> None:
    model = tiny_llama()
    for stage in (_stage(), _stage(symmetric=False), _stage(dtype="nvfp4"), _stage(dtype="fp8")):
        assert stage.storage(model, stage.resolve(model)) == ("compressed-tensors", None)
    # asymmetric, two config groups (per-row on the 128-wide layers, g128 on down_proj):
    # the dequantize=True load they need decodes every dense module with the first group
    wide = tiny_llama(hidden_size=128, intermediate_size=256)
    stage = _stage(symmetric=False, group_size=128)
    storage, reason = stage.storage(wide, stage.resolve(wide))
    assert storage == "knowpress" and reason is not None and "one config group" in reason
    forced = stage.model_copy(update={"format": "compressed-tensors"})
    with pytest.raises(KnowpressError, match="compressed-tensors cannot hold this output"):
        forced.storage(wide, forced.resolve(wide))
    embed = _stage().model_copy(update={"targets": ["model.embed_tokens"], "ignore": []})
    storage, reason = embed.storage(model, embed.resolve(model))
    assert storage == "knowpress" and "embedding table" in (reason or "")


def test_a_folder_whose_weights_do_not_all_load_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    method = RTN(name="rtn", bits=4, group_size=32, symmetric=True)
    save_model(_quantized(method, "compressed-tensors"), tiny_tokenizer(), tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    renamed = {
        k.replace("layers.1.mlp.", "layers.1.block_sparse_moe."): v for k, v in state.items()
    }
    save_file(renamed, str(file), metadata={"format": "pt"})
    with pytest.raises(KnowpressError, match=r"not in the checkpoint \(first: model\.layers\.1"):
        load_model(tmp_path)


def test_a_config_group_targeting_the_linear_class_loads(tmp_path: Path) -> None:
    """llm-compressor's presets (W4A16) target ``Linear`` by class, not by name."""
    method = RTN(name="rtn", bits=4, group_size=32, symmetric=True)
    model = _quantized(method, "compressed-tensors")
    save_model(model, tiny_tokenizer(), tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    groups = config["quantization_config"]["config_groups"]
    assert len(groups) == 1
    next(iter(groups.values()))["targets"] = ["Linear"]
    path.write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    packed = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14 and all(m.bits == 4 for m in packed)
