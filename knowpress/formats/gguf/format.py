"""``gguf``: a folder holding ``model.gguf`` (llama.cpp's single-file format: weights,
hyper-parameters and tokenizer), the tokenizer files and ``knowpress_gguf.json`` (what the
export did: weight types per tensor, parity), written by the export stage only.

Scored by the ``torch-gguf`` runtime (``runtimes/loader.py``): ``load`` reads the file back
with the ``gguf`` package, dequantizes every tensor to float32 and builds the Hugging Face
Llama from the file's metadata (``reader.py``), so a report row measures the weights the
file stores. It is PyTorch running those dequantized weights, not llama.cpp running the
file: ``benchmarks/gguf.py`` compares llama.cpp's greedy tokens separately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError
from knowpress.formats.base import Format, register

GGUF_FILE = "model.gguf"
RECORD_FILE = "knowpress_gguf.json"
RUNTIME = "torch-gguf"
#: what a GGUF row's runtime is (its ``describe()``)
RUNTIME_NOTE = (
    "scored in PyTorch from the file's dequantized tensors (gguf.quants), not run by llama.cpp"
)
#: the KV cache a GGUF row is counted in: llama.cpp's default cache type (f16)
KV_DTYPE = "float16"


def require_gguf() -> Any:
    """The ``gguf`` package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise KnowpressError(
            "GGUF export and scoring need the gguf package: pip install 'knowpress[export]'"
        ) from None
    return gguf


def read_record(folder: Path) -> dict[str, Any]:
    """``knowpress_gguf.json`` (what the export wrote; empty when absent or unreadable)."""
    try:
        data = json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@register
class GGUFFormat(Format):
    name = "gguf"
    runtime = RUNTIME
    detect_order = 30
    summary = "GGUF file for llama.cpp (Q8_0 / Q4_0 / Q4_K), scored dequantized in PyTorch"

    def detect(self, folder: Path) -> bool:
        folder = Path(folder)
        return (folder / GGUF_FILE).is_file() and (folder / RECORD_FILE).is_file()

    def load(self, location: str, dtype: Any, trust_remote_code: bool) -> Any:
        """The Llama the file describes, its tensors dequantized (``reader.py``), and the
        tokenizer saved beside it."""
        from transformers import AutoTokenizer

        from knowpress.formats.gguf.reader import read_model

        path = Path(location) / GGUF_FILE
        if not path.is_file():
            raise KnowpressError(f"{location}: no {GGUF_FILE}; re-run the export")
        model = read_model(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
        return model, tokenizer
