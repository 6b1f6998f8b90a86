"""Load and save causal LMs as HF directories, safetensors only.

A directory written by knowpress without packed layers is an ordinary ``save_pretrained``
directory (float tensors in the deploy dtype). When weights are stored packed (low-bit
quantization), ``knowpress_quant.json`` beside ``config.json`` lists every packed module and
its format, and the config is marked so that stock transformers refuses the folder instead
of loading random weights (``packed.py``); :func:`load_model` rebuilds those modules before
loading the tensors, so what is measured is exactly what is stored.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knowpress.core.errors import KnowpressError, disk_full, error_summary, short
from knowpress.core.io import atomic_write_text, follow_umask
from knowpress.core.registry import close_matches

QUANT_FILE = "knowpress_quant.json"
PACKED_VERSION = 2  # 2: zero points packed at the code width
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def deploy_dtype_of(key: str, tensor: torch.Tensor, packed: set[str], dtype: torch.dtype | None
                    ) -> torch.dtype:  # fmt: skip
    """The dtype ``key`` is stored in: packed tensors (codes, scales, zero points) keep their
    own; other float tensors take the deploy ``dtype`` (None: as they are)."""
    if dtype is None or not tensor.is_floating_point() or packed_tensor_of(key, packed):
        return tensor.dtype
    return dtype


def packed_tensor_of(key: str, packed: set[str]) -> str | None:
    """For a packed buffer (``...q_proj.weight_scale``, ``...experts.down_proj_packed``) of a
    packed module, the name of the tensor it stores (``...q_proj.weight``); else None."""
    module, _, attr = key.rpartition(".")
    if module not in packed:
        return None
    for suffix in ("_packed", "_scale", "_zero_point"):
        if attr.endswith(suffix):
            return f"{module}.{attr[: -len(suffix)]}"
    return None


def packed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if callable(getattr(module, "packing_spec", None))
    }


def _deploy_state(model: PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with float tensors cast to ``dtype``; tensors shared before (tied
    weights) stay shared, so ``save_pretrained`` still stores them once."""
    packed = set(packed_modules(model))
    cast: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        target = deploy_dtype_of(key, tensor, packed, dtype)
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident not in cast:
            cast[ident] = tensor.to(target)
        state[key] = cast[ident]
    return state


def _set_dtype(directory: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        config = json.loads((directory / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_text(
            directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n"
        )


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    dtype: torch.dtype | None = None,
) -> str:
    """``save_pretrained`` (safetensors) for model and tokenizer, plus the packing plan;
    returns the format: ``hf`` (no packed layers), ``hf-compressed-tensors`` (packed linears
    whose ``storage`` is compressed-tensors: stock transformers loads them, ``ct_format.py``)
    or ``hf-packed`` (knowpress's format: ``packed.py``).

    ``dtype`` is the deploy dtype of every float tensor no stage compressed (None: keep the
    model's); packed codes, scales and zero points keep their own. The in-memory model is
    not changed. transformers' shard-writing tqdm bar is hidden meanwhile.
    """
    from knowpress.formats import compressed_tensors as ct_format
    from knowpress.formats.knowpress_packed import mark_packed

    directory = Path(directory)
    modules = packed_modules(model)
    ct = bool(modules) and all(
        getattr(m, "storage", "") == ct_format.FORMAT for m in modules.values()
    )
    if ct and (reason := ct_format.blocker(modules.items())):
        raise KnowpressError(f"compressed-tensors: {reason}")
    state = _deploy_state(model, dtype) if dtype is not None else None
    if ct:  # codes re-packed as compressed-tensors words, nothing re-quantized
        state = {k: v for k, v in (state or model.state_dict()).items()
                 if packed_tensor_of(k, set(modules)) is None}  # fmt: skip
        state.update(ct_format.ct_state(modules))
    # A knowpress-packed folder keeps the in-memory tensor names (knowpress loads it as it
    # is); others are written in the architecture's original layout for stock transformers.
    _save_weights(model, directory, state, original_format=ct or not modules)
    if ct:
        tokenizer.save_pretrained(directory)
        _set_dtype(directory, dtype)
        ct_format.write_config(directory, modules)
        return "hf-compressed-tensors"
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    plan = {name: module.packing_spec() for name, module in modules.items()}
    if plan:
        payload = {"format": "knowpress-packed", "version": PACKED_VERSION, "modules": plan}
        atomic_write_text(directory / QUANT_FILE, json.dumps(payload, indent=1, sort_keys=True))
        config = mark_packed(config)
    if dtype is not None or plan:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_text(directory / "config.json", text)
    return "hf-packed" if plan else "hf"


def _save_weights(model: PreTrainedModel, directory: Path, state: dict[str, torch.Tensor] | None,
                  original_format: bool) -> None:  # fmt: skip
    """``save_pretrained`` of the weights, its tqdm bar hidden, ENOSPC as one ``OSError``,
    the files given the umask's mode (transformers writes them 0600)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state,
                              save_original_format=original_format)  # fmt: skip
    except Exception as exc:
        if disk_full(exc):  # safetensors reports ENOSPC as its own error type
            raise OSError(errno.ENOSPC, "No space left on device", str(directory)) from None
        raise
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    for written in directory.glob("*.safetensors*"):
        follow_umask(written)


def check_local(path: Path, source: str | Path) -> None:
    """The folder holds what a load needs, each file readable: one line for what is not."""
    from knowpress.formats.sizes import read_header

    if not path.is_dir():
        raise KnowpressError(f"model path {source}: no such directory (give an HF model dir)")
    if not (path / "config.json").is_file():
        raise KnowpressError(f"model path {path}: no config.json (not an HF model directory)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise KnowpressError(f"{path / 'config.json'}: not a JSON object (a model config)")
    _check_model_type(path / "config.json", config)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise KnowpressError(
            f"model path {path}: no *.safetensors weights (knowpress never loads pickle "
            f"*.bin files; convert them with safetensors first)"
        )
    for file in weights:
        read_header(file)
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
    from knowpress.formats.compressed_tensors import is_ct_folder, load_ct
    from knowpress.formats.knowpress_packed import load_packed, packed_config

    torch_dtype = _DTYPES[dtype]
    path = Path(source)
    looks_local = (
        path.exists() or str(source).startswith((".", "/", "~")) or os.sep * 2 in str(source)
    )
    if looks_local:
        path = path.expanduser()
        check_local(path, source)
    counts = _expert_counts(path) if looks_local else None
    if counts is not None and (is_ct_folder(path) or (path / QUANT_FILE).is_file()):
        raise KnowpressError(
            f"{path}: uneven expert counts with packed weights cannot be loaded yet; prune "
            "experts with budget: per_layer (a uniform count) before quantizing"
        )
    try:
        if counts is not None:
            from knowpress.arch.moe import load_uneven

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = load_uneven(path, counts, torch_dtype, trust_remote_code)
        elif looks_local and is_ct_folder(path):
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = load_ct(path, torch_dtype, trust_remote_code)
        elif looks_local and (path / QUANT_FILE).is_file():
            config = packed_config(path, trust_remote_code)  # the marked config.json is not it
            tokenizer = AutoTokenizer.from_pretrained(
                source, config=config, trust_remote_code=trust_remote_code
            )
            model = load_packed(path, torch_dtype, trust_remote_code)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
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
