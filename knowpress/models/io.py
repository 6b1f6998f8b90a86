"""Load and save causal LMs as HF directories, safetensors only.

A directory written by knowpress is an ordinary ``save_pretrained`` directory. When weights
are stored packed (low-bit quantization), ``knowpress_quant.json`` beside ``config.json``
lists every packed module and its format; :func:`load_model` rebuilds those modules before
loading the tensors, so what is measured is exactly what is stored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knowpress.errors import KnowpressError

QUANT_FILE = "knowpress_quant.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only on success.

    A crash or Ctrl-C inside the block, or during the swap, leaves ``final`` as it was (old
    content or absent) and removes the temporary directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    old: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # interrupted between the two renames: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) to write; rename it to ``path`` only
    on success and remove it on any failure, so ``path`` is complete or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through ``atomic_file``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def stored_bytes(directory: Path) -> int:
    """Bytes of the weight files actually on disk (``*.safetensors``)."""
    files = list(Path(directory).glob("*.safetensors"))
    if not files:
        raise KnowpressError(f"{directory}: no *.safetensors weight files")
    return sum(f.stat().st_size for f in files)


def parameter_count(model: torch.nn.Module) -> int:
    """Logical parameter count: packed modules count their unpacked weight elements."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        logical = getattr(module, "logical_parameters", None)
        if callable(logical):
            total += logical()
            seen.update(id(p) for p in module.parameters(recurse=False))
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """``save_pretrained`` (safetensors) for model and tokenizer, plus the packing plan.

    transformers' shard-writing tqdm bar is hidden meanwhile (it would interleave with
    knowpress's own progress) and restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    plan = {
        name: module.packing_spec()
        for name, module in model.named_modules()
        if callable(getattr(module, "packing_spec", None))
    }
    if plan:
        payload = {"format": "knowpress-packed", "version": 1, "modules": plan}
        atomic_write_text(directory / QUANT_FILE, json.dumps(payload, indent=1, sort_keys=True))


def _load_packed(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    from knowpress.compress.quant.qlinear import QuantLinear

    plan = json.loads((directory / QUANT_FILE).read_text())
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in plan["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantLinear.empty_like(linear, spec, dtype=dtype))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.startswith("lm_head.")]
    if missing or unexpected:
        raise KnowpressError(
            f"{directory}: packed checkpoint does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run the stage with --force"
        )
    model.tie_weights()
    return model.eval()


def load_model(
    source: str | Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    Only safetensors weights are accepted. A missing local path, or a hub id that cannot be
    fetched (offline machine), is a :class:`KnowpressError` naming the path and the fix.
    """
    torch_dtype = _DTYPES[dtype]
    path = Path(source)
    looks_local = (
        path.exists() or str(source).startswith((".", "/", "~")) or os.sep * 2 in str(source)
    )
    if looks_local:
        path = path.expanduser()
        if not path.is_dir():
            raise KnowpressError(f"model path {source}: no such directory (give an HF model dir)")
        if not (path / "config.json").is_file():
            raise KnowpressError(f"model path {path}: no config.json (not an HF model directory)")
        if not list(path.glob("*.safetensors")):
            raise KnowpressError(
                f"model path {path}: no *.safetensors weights (knowpress never loads pickle "
                f"*.bin files; convert them with safetensors first)"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if looks_local and (path / QUANT_FILE).is_file():
            model = _load_packed(path, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
    except KnowpressError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KnowpressError(
            f"could not load model {source!r}: {first} (no network here? give a local directory)"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
