"""Stock transformers on compressed-tensors folders, in a subprocess that never imports
knowpress (one subprocess for many folders: each start costs seconds), and knowpress's own
side of the comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from knowpress.core.progress import Progress
from knowpress.formats.weights import packed_modules
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.targets import select

IDS = [[1, 5, 9, 30, 7, 3, 8]]
NEW_TOKENS = 8
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for case in json.loads(sys.argv[2]):
    kwargs = {"dtype": getattr(torch, case["dtype"])}
    if case["dequantize"]:
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(case["folder"], **kwargs)
        with torch.no_grad():
            logits = model(ids).logits.float()
            tokens = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        out[case["name"]] = {"logits": logits.flatten().tolist(), "tokens": tokens.tolist()}
    except Exception as exc:
        out[case["name"]] = {"error": type(exc).__name__ + ": " + str(exc).splitlines()[-1][:300]}
assert "knowpress" not in sys.modules
print(json.dumps(out))
""".replace("NEW", str(NEW_TOKENS))


def stock(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each case (``name``, ``folder``, ``dequantize``, ``dtype``) loaded by stock
    ``AutoModelForCausalLM.from_pretrained``: its logits on :data:`IDS` and greedy tokens,
    or the error it raised."""
    run = subprocess.run(
        [sys.executable, "-c", STOCK, json.dumps(IDS), json.dumps(cases)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def quantized(model: torch.nn.Module, block: dict[str, Any], storage: str = "compressed-tensors",
              calibration: Any = None) -> torch.nn.Module:  # fmt: skip
    """``model`` quantized by the method ``block`` (every linear and expert but the head),
    its packed modules to be saved as ``storage``."""
    method = QUANT_METHODS.get(block["name"]).model_validate(block)
    method.apply(model, select(model, None, ["lm_head"]), calibration, Progress(False))
    for module in packed_modules(model).values():
        module.storage = storage
    return model


@torch.no_grad()
def ours(model: torch.nn.Module) -> tuple[torch.Tensor, list[list[int]]]:
    ids = torch.tensor(IDS)
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    return model(ids).logits.float(), tokens.tolist()


def tensors(folder: Path) -> dict[str, bytes]:
    """Every stored tensor's bytes (a re-save must write the same)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in state.items()}
