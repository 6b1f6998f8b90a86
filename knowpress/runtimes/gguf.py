"""The ``torch-gguf`` runtime: a ``gguf`` artifact's file read back into PyTorch.

``formats/gguf/format.py``'s ``load`` rebuilds the Llama from the file's metadata and its
dequantized tensors, so every task scores the weights the file stores. It is PyTorch
running those weights in float32, not llama.cpp running the file (``describe`` says so);
KV bytes are counted at llama.cpp's default cache type, float16. A GGUF file carries no KV
policy: a manifest attaching one other than the full cache is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from knowpress.core.errors import KnowpressError
from knowpress.runtimes.torch import TorchRuntime


class GGUFRuntime(TorchRuntime):
    name = "torch-gguf"

    def __init__(self, *args: Any, weights: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights

    def describe(self) -> dict[str, Any]:
        from knowpress.formats.gguf.format import RUNTIME_NOTE

        return super().describe() | {"weights": self.weights, "note": RUNTIME_NOTE}


def load_gguf(location: str, manifest: Any, options: Any) -> GGUFRuntime:
    """The runtime of a ``gguf`` artifact (``RUNTIMES["torch-gguf"]``)."""
    from knowpress.formats.base import FORMATS
    from knowpress.formats.gguf.format import KV_DTYPE, read_record, require_gguf
    from knowpress.runtimes.loader import expert_skip_of, kv_policy_of

    require_gguf()
    where = str(Path(location) / "knowpress_artifact.json")
    policy = kv_policy_of(manifest, where)
    if (policy is not None and policy.name != "full") or expert_skip_of(manifest, where):
        raise KnowpressError(f"{where}: a GGUF artifact carries no runtime policy")
    dtype = getattr(torch, options.dtype)
    model, tokenizer = FORMATS.get("gguf").load(location, dtype, options.trust_remote_code)
    if tokenizer.pad_token is None:  # as load_model does
        tokenizer.pad_token = tokenizer.eos_token
    record = read_record(Path(location))
    return GGUFRuntime(
        model.to(options.device).eval(),
        tokenizer,
        batch_size=options.batch_size,
        kv_policy=policy,
        kv_dtype=KV_DTYPE,
        weights=str(record.get("label", record.get("weights", "gguf"))),
    )
