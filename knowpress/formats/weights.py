"""Writing a model's weights: safetensors through ``save_pretrained`` in the deploy dtype
(packed codes, scales and zero points keep their own), its progress bar hidden, a full disk
named, the files given the umask's mode. Every torch-side format saves through here."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

from knowpress.core.errors import disk_full
from knowpress.core.io import atomic_write_text, follow_umask
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE


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
    for suffix in ("_packed", "_global_scale", "_scale", "_zero_point"):
        if attr.endswith(suffix):
            return f"{module}.{attr[: -len(suffix)]}"
    return None


def packed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if callable(getattr(module, "packing_spec", None))
    }


def deploy_state(model: PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def set_dtype(directory: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        config = json.loads((directory / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_text(
            directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n"
        )


def save_weights(model: PreTrainedModel, directory: Path, state: dict[str, torch.Tensor] | None,
                  original_format: bool, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                  ) -> None:  # fmt: skip
    """``save_pretrained`` of the weights, its tqdm bar hidden, ENOSPC as one ``OSError``,
    the files given the umask's mode (transformers writes them 0600). A state larger than
    ``max_shard_size`` bytes is written as ``model-0000K-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` (``shards.py``); a tensor larger than it gets a shard of
    its own."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state,
                              save_original_format=original_format,
                              max_shard_size=max_shard_size)  # fmt: skip
    except Exception as exc:
        if disk_full(exc):  # safetensors reports ENOSPC as its own error type
            raise OSError(errno.ENOSPC, "No space left on device", str(directory)) from None
        raise
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    for written in directory.glob("*.safetensors*"):
        follow_umask(written)
