"""compressed-tensors for every grid a dense linear can hold — asymmetric int (packed zero
points), fp8 per channel and in blocks, nvfp4, mxfp4 — with RTN and GPTQ: stock transformers
(no knowpress import) loads each folder and computes what knowpress's own load of it computes,
its weights differing only by the rounding stock decompression applies (float16 products of
int codes and scales under ``dequantize=True``, bfloat16 for nvfp4's unpacker); knowpress reads
the codes back exactly, predicts the bytes and passes its integrity check."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from ct_stock import ours, quantized, stock, tensors

from knowpress.formats.base import detect
from knowpress.formats.io import load_model, save_model
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.targets import select
from knowpress.pipeline.integrity import check_folder
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.models import tiny_llama, tiny_tokenizer

pytest.importorskip("compressed_tensors")

#: name -> (method block, stock load with dequantize=True, the rounding stock weights get)
CASES: dict[str, tuple[dict[str, Any], bool, torch.dtype | None]] = {
    "int4-asym-g32": ({"name": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
                      True, torch.float16),
    "int8-asym-per-row": ({"name": "rtn", "bits": 8, "group_size": None, "symmetric": False},
                          True, torch.float16),
    "int3-asym-gptq": ({"name": "gptq", "bits": 3, "group_size": 32, "symmetric": False},
                       True, torch.float16),
    "fp8-channel": ({"name": "rtn", "dtype": "fp8"}, False, None),
    "fp8-block64-gptq": ({"name": "gptq", "dtype": "fp8", "group_size": 64}, False, None),
    "nvfp4": ({"name": "rtn", "dtype": "nvfp4"}, True, torch.bfloat16),
    "nvfp4-gptq": ({"name": "gptq", "dtype": "nvfp4"}, True, torch.bfloat16),
    "mxfp4": ({"name": "rtn", "dtype": "mxfp4"}, True, None),
    "mxfp4-gptq": ({"name": "gptq", "dtype": "mxfp4"}, True, None),
}  # fmt: skip


def _model() -> torch.nn.Module:
    return tiny_llama(hidden_size=128, intermediate_size=256)


def _calibration(max_positions: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 128, (8, 32), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case quantized and saved, and what stock transformers makes of each folder."""
    built: dict[str, Any] = {}
    cases = []
    for name, (block, dequantize, _) in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        model = quantized(_model(), block, calibration=_calibration)
        assert save_model(model, tiny_tokenizer(), folder) == "hf-compressed-tensors"
        built[name] = (folder, model)
        cases.append({"name": name, "folder": str(folder), "dequantize": dequantize,
                      "dtype": "float32"})  # fmt: skip
    # nvfp4 also loads with the default (compressed) route in bfloat16 on a CPU
    cases.append({"name": "nvfp4-bf16", "folder": str(built["nvfp4"][0]), "dequantize": False,
                  "dtype": "bfloat16"})  # fmt: skip
    return {"built": built, "stock": stock(cases)}


def _twin(model: torch.nn.Module, rounding: torch.dtype | None) -> torch.nn.Module:
    """``model`` with every packed linear a float one holding its weights as stock
    decompression rounds them."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear):
            weight = module.dequantized_weight(torch.float32)
            if rounding is not None:
                weight = weight.to(rounding).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data.copy_(weight)
            twin.set_submodule(name, linear)
    return twin


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_loads_it_as_knowpress_does(name: str, folders: dict[str, Any]) -> None:
    folder, model = folders["built"][name]
    result = folders["stock"][name]
    assert "error" not in result, result.get("error")
    reloaded, _ = load_model(folder)  # knowpress's own load: the codes as stored
    logits, tokens = ours(reloaded)
    assert torch.equal(logits, ours(model)[0])  # ... and what the in-memory model computed
    theirs = torch.tensor(result["logits"]).reshape(logits.shape)
    assert result["tokens"] == tokens
    twin_logits, _ = ours(_twin(reloaded, CASES[name][2]))
    assert torch.allclose(theirs, twin_logits, atol=1e-5), (theirs - twin_logits).abs().max()
    assert torch.allclose(theirs, logits, atol=2e-2)  # the rounding's whole effect


def test_nvfp4_loads_in_bfloat16_without_dequantize(folders: dict[str, Any]) -> None:
    result = folders["stock"]["nvfp4-bf16"]
    assert "error" not in result, result.get("error")
    assert torch.allclose(torch.tensor(result["logits"]), ours(folders["built"]["nvfp4"][1])[0]
                          .flatten(), atol=0.1)  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_reload_resave_bytes_and_integrity(name: str, folders: dict[str, Any],
                                           tmp_path: Path) -> None:  # fmt: skip
    folder, _ = folders["built"][name]
    block = CASES[name][0]
    assert detect(folder)[0].name == "hf-compressed-tensors"
    reloaded, tokenizer = load_model(folder)
    packed = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14 and {m.storage for m in packed} == {"compressed-tensors"}
    assert {m.grid for m in packed} == {block.get("dtype", "int")}
    assert save_model(reloaded, tokenizer, tmp_path) == "hf-compressed-tensors"
    assert tensors(tmp_path) == tensors(folder)  # a later stage re-saves the same tensors
    fresh = _model()
    assignments = resolve(QUANT_METHODS.get(block["name"]).model_validate(block), None,
                          select(fresh, None, ["lm_head"]))  # fmt: skip
    predicted = predicted_bytes(fresh, assignments, "float32", "compressed-tensors")
    check_folder(assignments, folder, predicted, "compressed-tensors")
