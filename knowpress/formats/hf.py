"""``hf``: a plain ``save_pretrained`` folder (safetensors, float tensors in the deploy dtype,
the architecture's original checkpoint layout): what a model with no packed layer is stored
as, and any user's model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowpress.core.io import atomic_write_text
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE
from knowpress.formats.base import Format, register
from knowpress.formats.weights import deploy_state, save_weights


@register
class HFFormat(Format):
    name = "hf"
    detect_order = 90  # the fallback: any config.json folder
    summary = "plain save_pretrained folder (safetensors)"

    def detect(self, folder: Path) -> bool:
        return (Path(folder) / "config.json").is_file()

    def holds(self, modules: dict[str, Any]) -> str | None:
        return f"{len(modules)} packed module(s) need a quantized format" if modules else None

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype | None,
             modules: dict[str, Any], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
             ) -> None:  # fmt: skip
        state = deploy_state(model, dtype) if dtype is not None else None
        save_weights(model, folder, state, original_format=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder)
        if dtype is not None:
            config = json.loads((folder / "config.json").read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True)
                              + "\n")  # fmt: skip

    def load(self, location: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        return model, tokenizer
