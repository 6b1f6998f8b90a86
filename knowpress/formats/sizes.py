"""Size accounting: bytes stored, bytes a bf16 copy would take, logical parameters, and the
bytes a save will take, predicted from the tensors alone.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data offsets, plus ``__metadata__``) padded with spaces to a multiple of 8, then the
raw tensor bytes. ``safetensors_bytes`` rebuilds that layout from (name, dtype, shape)
entries, so a prediction counts the header too.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from knowpress.core.errors import KnowpressError, short

if TYPE_CHECKING:
    import torch

#: safetensors dtype tags and their item sizes
_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}

Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype tag, shape)


def dtype_tag(dtype: torch.dtype) -> str:
    """The safetensors tag of a torch dtype (``torch.bfloat16`` -> ``BF16``)."""
    tags = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
            "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
            "bool": "BOOL", "float8_e4m3fn": "F8_E4M3"}  # fmt: skip
    return tags[str(dtype).removeprefix("torch.")]


def read_header(file: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets), checked
    against the file's size: an empty, truncated or corrupt file is one clear line."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(size, 100_000_000):
                raise ValueError("its header length is past the end of the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
        reason = "it is empty" if file.exists() and file.stat().st_size == 0 else short(exc)
        raise KnowpressError(f"{file}: not a valid safetensors file ({reason})") from None
    if 8 + length + end != size:
        raise KnowpressError(
            f"{file}: truncated or corrupt safetensors ({size:,} bytes, its header describes "
            f"{8 + length + end:,}); write it again (a stage: rerun with --resume)"
        )
    return header


def safetensors_files(directory: Path) -> list[Path]:
    """The folder's weight files: every shard its index names, else its ``*.safetensors``
    (``shards.weight_files``); none is one line."""
    from knowpress.formats.shards import weight_files

    files = weight_files(Path(directory))
    if not files:
        raise KnowpressError(f"{directory}: no *.safetensors weight files")
    return files


def index_bytes(directory: Path) -> int:
    """Bytes of the folder's shard index (``model.safetensors.index.json``; 0 without one)."""
    from knowpress.formats.shards import INDEX_FILE

    index = Path(directory) / INDEX_FILE
    return index.stat().st_size if index.is_file() else 0


def bf16_bytes(directory: Path) -> int:
    """Bytes the directory's safetensors would take with every float tensor in bfloat16
    (integer tensors as they are), headers included, every shard and the index counted:
    the size users deploy."""
    total = index_bytes(directory)
    for file in safetensors_files(directory):
        header = read_header(file)
        entries = [
            (name, "BF16" if info["dtype"] in _FLOAT_TAGS else info["dtype"], tuple(info["shape"]))
            for name, info in header.items()
        ]
        total += safetensors_bytes(entries)
    return total


def one_file_bytes(directory: Path) -> int:
    """Bytes of the folder's tensors as one safetensors file: a single file's size, or for
    shards the file holding all their entries (one header, no index) -- what a plan that
    predicts one file (``safetensors_bytes``) is compared with."""
    files = safetensors_files(directory)
    if len(files) == 1 and not index_bytes(directory):
        return files[0].stat().st_size
    entries: list[Entry] = []
    for file in files:
        header = read_header(file)
        order = sorted(header, key=lambda name: header[name]["data_offsets"][0])
        entries += [(n, header[n]["dtype"], tuple(header[n]["shape"])) for n in order]
    return safetensors_bytes(entries)


def payload_bytes(entries: Iterable[Entry]) -> int:
    """Bytes of the tensors' data alone (no header): what a bit plan's budget counts."""
    return sum(_ITEM_BYTES[tag] * math.prod(shape) for _, tag, shape in entries)


def safetensors_bytes(entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> int:
    """Size of the safetensors file holding ``entries`` (header rebuilt, padded to 8)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tag, shape in entries:
        size = _ITEM_BYTES[tag] * math.prod(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text) % 8 + offset


def parameter_count(model: torch.nn.Module) -> int:
    """Logical parameter count: packed modules count their unpacked weight elements; tied
    tensors count once."""
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


def bits_per_parameter(stored: int, parameters: int) -> float:
    """Effective bits per logical parameter of what is stored (8 · bytes / parameters)."""
    if parameters <= 0:
        raise ValueError("bits per parameter of a model with no parameters")
    return 8 * stored / parameters
