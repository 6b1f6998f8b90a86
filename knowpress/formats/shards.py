"""Sharded safetensors folders, as transformers writes and reads them: the weights in one
``model.safetensors`` or, past ``max_shard_size``, in ``model-0000K-of-0000N.safetensors``
shards with ``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file).

Whatever reads a folder's weights itself goes through here: :func:`weight_files` (the shards
the index names, else every ``*.safetensors``; a shard the index names and the folder lacks
is one line), :func:`folder_header` (every tensor's header entry, each file checked against
its size and the index against the shards), :func:`weight_bytes` (every weight file plus the
index: the bytes a folder without a manifest stores), :class:`LazyTensors` and
:func:`shard_states` (tensors read through ``safe_open``, one at a time or one shard at a
time, never every shard into one dict).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowpress.core.errors import KnowpressError, short
from knowpress.formats.sizes import read_header

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
_REWRITE = "write the folder again (a stage: rerun with --resume)"


def read_index(folder: Path) -> dict[str, str] | None:
    """The index's ``weight_map`` (tensor -> shard file name), or None without an index."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    weights = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weights, dict)
        or not weights
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weights.items())
    ):
        raise KnowpressError(
            f"{path}: not a safetensors index (a JSON object whose weight_map maps tensor names "
            f"to shard files); {_REWRITE}"
        )
    bad = next((v for v in weights.values()
                if Path(v).name != v or not v.endswith(".safetensors")), None)  # fmt: skip
    if bad is not None:
        raise KnowpressError(
            f"{path}: shard {short(bad, 80)!r} is not a .safetensors file of this folder; "
            f"{_REWRITE}"
        )
    return weights


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: the shards its index names (each must exist), else every
    ``*.safetensors`` in it (possibly none)."""
    folder = Path(folder)
    index = read_index(folder)
    if index is None:
        return sorted(folder.glob("*.safetensors"))
    files = [folder / name for name in sorted(set(index.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise KnowpressError(
            f"{folder}: shard {missing[0]} named in {INDEX_FILE} is missing ({len(missing)} of "
            f"{len(files)} shards); copy it back or {_REWRITE}"
        )
    return files


def folder_header(folder: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's header entry (dtype, shape, offsets) across the folder's weight files,
    each file checked against its size; with an index, each tensor it names is in the shard
    it names."""
    folder = Path(folder)
    merged: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for file in weight_files(folder):
        for name, info in read_header(file).items():
            merged[name], where[name] = info, file.name
    index = read_index(folder)
    for name, shard in (index or {}).items():
        if where.get(name) != shard:
            raise KnowpressError(
                f"{folder / INDEX_FILE}: {short(name, 80)} should be in {shard}, which does not "
                f"hold it; {_REWRITE}"
            )
    return merged


def weight_bytes(folder: Path) -> int:
    """Bytes of the folder's weight files and its index."""
    index = Path(folder) / INDEX_FILE
    extra = index.stat().st_size if index.is_file() else 0
    return sum(f.stat().st_size for f in weight_files(folder)) + extra


class LazyTensors(Mapping[str, "torch.Tensor"]):
    """The folder's tensors by name, each read from its shard only when asked (``safe_open``
    memory-maps the file; nothing else is loaded). Use as a context manager: the shards are
    closed on exit."""

    def __init__(self, folder: Path) -> None:
        self._where = {name: file for file in weight_files(folder) for name in read_header(file)}
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = self._stack.enter_context(safe_open(str(file), "pt"))
        return self._handles[file].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __enter__(self) -> LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()
        self._stack.close()


def shard_states(folder: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The folder's tensors one weight file at a time (name -> tensor)."""
    from safetensors import safe_open

    for file in weight_files(folder):
        with safe_open(str(file), "pt") as handle:
            yield {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
