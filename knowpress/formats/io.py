"""Load and save causal LMs as HF directories, safetensors only.

A directory written by knowpress without packed layers is an ordinary ``save_pretrained``
directory (float tensors in the deploy dtype). When weights are stored packed (low-bit
quantization), ``knowpress_quant.json`` beside ``config.json`` lists every packed module and
its format, and the config is marked so that stock transformers refuses the folder instead
of loading random weights (``packed.py``); :func:`load_model` rebuilds those modules before
loading the tensors, so what is measured is exactly what is stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knowpress.core.errors import KnowpressError, error_summary, short
from knowpress.core.registry import close_matches
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE
from knowpress.formats.base import FORMATS, detect, format_for
from knowpress.formats.weights import packed_modules

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


#: the formats save_model writes, in the order it tries them (formats/base.py)
SAVE_ORDER = ("hf", "hf-compressed-tensors", "hf-packed")


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Save model and tokenizer (safetensors) in the first format of :data:`SAVE_ORDER` that
    holds it and return that format's name: ``hf`` (no packed layers),
    ``hf-compressed-tensors`` (packed linears the quantize stage stored as compressed-tensors:
    stock transformers loads them) or ``hf-packed`` (knowpress's format). A model the stage
    meant for compressed-tensors that it cannot hold is one line, not a silent fallback.

    ``dtype`` is the deploy dtype of every float tensor no stage compressed (None: keep the
    model's); packed codes, scales and zero points keep their own. The in-memory model is
    not changed. transformers' shard-writing tqdm bar is hidden meanwhile. Weights larger
    than ``max_shard_size`` bytes are written as shards with an index (``shards.py``).
    """
    from knowpress.formats.compressed_tensors import FORMAT

    directory = Path(directory)
    modules = packed_modules(model)
    if modules and all(getattr(m, "storage", "") == FORMAT for m in modules.values()):
        reason = FORMATS.get("hf-compressed-tensors").holds(modules)
        if reason:
            raise KnowpressError(f"compressed-tensors: {reason}")
    fmt = format_for(modules, SAVE_ORDER)
    fmt.save(model, tokenizer, directory, dtype, modules, max_shard_size)
    return fmt.name


def format_reason(model: PreTrainedModel) -> str | None:
    """Why ``model`` is stored in knowpress's packed format (what keeps it out of
    compressed-tensors, the public format a packed model would take); None for others."""
    from knowpress.formats.compressed_tensors import blocker, items_of

    modules = packed_modules(model)
    if format_for(modules, SAVE_ORDER).name != "hf-packed":
        return None
    reason = blocker(items_of(modules), model)
    return reason or "the quantize stage stored its codes in knowpress's format (format: knowpress)"


def check_local(path: Path, source: str | Path) -> None:
    """The folder holds what a load needs, each file readable: one line for what is not
    (a sharded folder: every shard its index names, each tensor where the index says)."""
    from knowpress.formats.shards import folder_header, weight_files

    if not path.is_dir():
        raise KnowpressError(f"model path {source}: no such directory (give an HF model dir)")
    exported = next((f for f in map(FORMATS.get, FORMATS.names())
                     if f.runtime != "torch" and f.detect(path)), None)  # fmt: skip
    if exported is not None:
        raise KnowpressError(
            f"model path {path}: an exported {exported.name} artifact, which no stage loads as a "
            f"model; score it with compress eval --model {path}, or give its input folder"
        )
    if not (path / "config.json").is_file():
        raise KnowpressError(f"model path {path}: no config.json (not an HF model directory)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise KnowpressError(f"{path / 'config.json'}: not a JSON object (a model config)")
    _check_model_type(path / "config.json", config)
    if not weight_files(path):
        raise KnowpressError(
            f"model path {path}: no *.safetensors weights (knowpress never loads pickle "
            f"*.bin files; convert them with safetensors first)"
        )
    folder_header(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise KnowpressError(
            f"model path {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save "
            f"the model's tokenizer into it with tokenizer.save_pretrained('{path}')"
        )


def _check_model_type(file: Path, config: dict[str, object]) -> None:
    """``model_type`` names an architecture this transformers knows (a packed folder: its
    ``knowpress_model_type``), unless the folder brings its own code (``auto_map``)."""
    import transformers
    from transformers import CONFIG_MAPPING

    from knowpress.formats.knowpress_packed import REAL_AUTO_MAP_KEY, REAL_TYPE_KEY

    if "auto_map" in config or REAL_AUTO_MAP_KEY in config:
        return  # remote code: trust_remote_code decides
    kind = config.get(REAL_TYPE_KEY, config.get("model_type"))
    if not isinstance(kind, str) or not kind:
        raise KnowpressError(
            f'{file}: no model_type (the architecture, e.g. "llama"); add it to config.json'
        )
    if kind not in CONFIG_MAPPING:
        hint = close_matches(kind[:100], list(CONFIG_MAPPING.keys()))
        did = f" (did you mean {' or '.join(repr(h) for h in hint)}?)" if hint else ""
        raise KnowpressError(
            f"{file}: model_type {short(kind, 80)!r} is not an architecture transformers "
            f"{transformers.__version__} knows{did}; fix model_type or upgrade transformers"
        )
    values = {k: v for k, v in config.items() if k not in ("model_type", REAL_TYPE_KEY)}
    try:  # the values' own types and ranges, as transformers checks them
        CONFIG_MAPPING[kind].from_dict(values)
    except Exception as exc:
        raise KnowpressError(f"{file}: {error_summary(exc)}; fix the value") from None


def _expert_counts(path: Path) -> list[int] | None:
    """The per-block expert counts a stage folder's manifest records (uneven pruning)."""
    from knowpress.formats.manifest import read_manifest

    manifest = read_manifest(path) if path.is_dir() else None
    counts = manifest.structure.get("experts_per_layer") if manifest is not None else None
    return [int(c) for c in counts] if counts else None


def load_model(
    source: str | Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id, in ``dtype``
    on ``device``.

    A stage folder whose manifest records uneven expert counts (``experts_per_layer``) is
    built from its config and cut to those counts before its tensors load
    (``arch/moe.py``). Only safetensors weights are accepted. A missing local path, or a
    hub id that cannot be fetched (offline machine), is a :class:`KnowpressError` naming the
    path and the fix.
    """

    torch_dtype = _DTYPES[dtype]
    path = Path(source)
    looks_local = (
        path.exists() or str(source).startswith((".", "/", "~")) or os.sep * 2 in str(source)
    )
    if looks_local:
        path = path.expanduser()
        check_local(path, source)
    counts = _expert_counts(path) if looks_local else None
    fmt = detect(path)[0] if looks_local else FORMATS.get("hf")
    if fmt.runtime != "torch":
        fmt.load(str(source), torch_dtype, trust_remote_code)  # one line: not a torch model
    if counts is not None and fmt.name != "hf":
        raise KnowpressError(
            f"{path}: uneven expert counts with packed weights cannot be loaded yet; prune "
            "experts with budget: per_layer (a uniform count) before quantizing"
        )
    try:
        if counts is not None:
            from knowpress.arch.moe import load_uneven

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = load_uneven(path, counts, torch_dtype, trust_remote_code)
        else:
            model, tokenizer = fmt.load(str(path if looks_local else source), torch_dtype,
                                        trust_remote_code)  # fmt: skip
    except KnowpressError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KnowpressError(
            f"could not load model {source!r}: {first} (no network here? give a local directory)"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
