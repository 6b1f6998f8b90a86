"""``export_gguf``: model -> ``model.gguf`` (+ tokenizer, record) -> parity, into a folder.

Shared by ``kind: export`` with ``format: gguf`` and ``compress export --format gguf``.
Steps: the input model's greedy tokens and logits on the parity prompts
(``export_parity.prompts``) are taken first; ``formats/gguf/writer.py`` writes the file,
changing the model in place to hold exactly what the file stores (carried codes, re-quantized
and quantized matrices as they decode); the file is read back with the gguf package's
dequantizers into a new PyTorch Llama (``formats/gguf/reader.py``) and compared:

- **parity** (gated): the read-back model against the in-memory model holding the stored
  weights, teacher-forced on that model's greedy tokens: max |Δlogits| over prefill and
  decode, relative to the largest logit, at most ``parity.max_rel_logits`` (default 1e-4:
  both compute in float32 from the same values, so only the file's round trip — names,
  permutation, metadata, block layout — can differ), and equal greedy tokens. Carried
  tensors are checked exact when written (``tensors.carry``).
- **quantization** (recorded, not gated: the report's scores measure it): the read-back
  model against the input model, teacher-forced on the input's greedy tokens — the error of
  the re-quantized and quantized tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.io import atomic_write_text
from knowpress.formats.gguf.format import GGUF_FILE, RECORD_FILE, RUNTIME_NOTE, require_gguf

#: parity.max_rel_logits default: the file read back against the same weights in float32
DEFAULT_MAX_REL = 1e-4


@torch.no_grad()
def forced_logits(model: Any, rows: list[list[int]], tokens: np.ndarray) -> np.ndarray:
    """Logits ``[B, S, V]`` of each prompt followed by its ``tokens``, left-padded, real
    positions only (flattened ``[N, V]``)."""
    from knowpress.runtimes.ort_session import left_padded

    sequences = [row + tokens[i].tolist() for i, row in enumerate(rows)]
    ids, valid = (torch.from_numpy(a) for a in left_padded(sequences, 0))
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=valid, position_ids=positions).logits.float()
    return logits[valid.bool()].numpy()


def _greedy(model: Any, rows: list[list[int]], steps: int) -> np.ndarray:
    from knowpress.pipeline.export_parity import torch_greedy

    return torch_greedy(model, rows, steps)[1]


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    worst = float(np.abs(other - reference).max())
    return {
        "max_abs_logits": worst,
        "max_rel_logits": worst / max(float(np.abs(reference).max()), 1e-12),
    }


def _label(weights: str, stored: list[Any]) -> str:
    counts: dict[str, int] = {}
    for tensor in stored:
        counts[tensor.how] = counts.get(tensor.how, 0) + 1
    types = sorted({t.qtype for t in stored if t.how != "float"})
    parts = [f"{counts[k]} {k}" for k in ("carried", "requantized", "quantized") if counts.get(k)]
    norms = counts.get("float", 0)
    return f"gguf {weights} ({'/'.join(types)}; {', '.join(parts)}; {norms} F32 norms)"


def export_gguf(
    model: Any, tokenizer: Any, folder: Path, config: Any, progress: Any
) -> dict[str, Any]:
    """Write ``model.gguf``, the tokenizer and ``knowpress_gguf.json`` into ``folder`` (being
    written atomically by the caller); returns the metrics (parity, quantization error, how
    each tensor was stored, bytes). ``config``: a ``stages.export.ExportConfig`` with
    ``format: gguf``. The model is changed in place (it ends holding the stored weights)."""
    from knowpress.formats.gguf.reader import read_model
    from knowpress.formats.gguf.writer import check_model, write_gguf
    from knowpress.formats.onnx.graph import as_float32
    from knowpress.pipeline import export_parity
    from knowpress.pipeline.export import undispatch

    require_gguf()
    check_model(model.config.get_text_config(decoder=True))
    undispatch(model)
    as_float32(model)
    text = model.config.get_text_config(decoder=True)
    rows = export_parity.prompts(config.parity.prompts, text.vocab_size, text.bos_token_id)
    steps = config.parity.new_tokens
    input_tokens = _greedy(model, rows, steps)
    input_logits = forced_logits(model, rows, input_tokens)
    path = Path(folder) / GGUF_FILE
    progress.log(f"[dim]gguf: writing {GGUF_FILE} ({config.weights})[/dim]")
    stored, vocab = write_gguf(path, model, tokenizer, config.weights)
    tokenizer.save_pretrained(folder)
    stored_tokens = _greedy(model, rows, steps)
    stored_logits = forced_logits(model, rows, stored_tokens)
    back = read_model(path)
    back_tokens = _greedy(back, rows, steps)
    parity = compare(stored_logits, forced_logits(back, rows, stored_tokens))
    parity |= {
        "prompts": len(rows),
        "new_tokens": steps,
        "greedy_equal": bool((back_tokens == stored_tokens).all()),
        "greedy_agreement": float((back_tokens == stored_tokens).mean()),
        "max_rel_limit": config.parity.max_rel_logits or DEFAULT_MAX_REL,
    }
    quantization = compare(input_logits, forced_logits(back, rows, input_tokens))
    quantization["greedy_agreement"] = float((back_tokens == input_tokens).mean())
    del back
    progress.log(
        f"[dim]gguf parity (file read back vs the same weights): max|Δlogits| "
        f"{parity['max_abs_logits']:.3g} (rel {parity['max_rel_logits']:.3g}), greedy equal "
        f"{parity['greedy_equal']}; vs the input model: max|Δlogits| "
        f"{quantization['max_abs_logits']:.3g} (rel {quantization['max_rel_logits']:.3g}), "
        f"greedy agreement {quantization['greedy_agreement']:.3f}[/dim]"
    )
    problem = export_parity.failure(parity, parity["max_rel_limit"], config.parity.greedy_equal)
    if problem:
        raise KnowpressError(f"parity: {problem.replace('exported graph', 'GGUF file')}")
    label = _label(config.weights, stored)
    tensors = {t.name: t.line() for t in stored}
    how = {k: sum(t.how == k for t in stored) for k in ("carried", "requantized", "quantized")}
    record = {
        "file": GGUF_FILE,
        "weights": config.weights,
        "label": label,
        "tokenizer": vocab,
        "runtime": RUNTIME_NOTE,
        "tensors": tensors,
        "parity": parity,
        "quantization": quantization,
    }
    atomic_write_text(Path(folder) / RECORD_FILE, json.dumps(record, indent=1))
    return {
        "weights": label,
        "format": "gguf",
        **{f"parity_{k}": v for k, v in parity.items()},
        **{f"quantization_{k}": v for k, v in quantization.items()},
        **how,
        "tensors": tensors,
        "tokenizer": vocab,
        "runtime_note": RUNTIME_NOTE,
        "file_bytes": {"gguf": path.stat().st_size},
    }
