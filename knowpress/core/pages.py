"""Resident pages of freed tensors that lived in a file mapping.

transformers loads safetensors on the CPU by mapping the file (``rw-p``, copy on write) and
viewing each tensor in place, so a model held as stored costs no anonymous memory: its pages
count in RSS as they are first read. When a block-wise stage replaces a weight (GPTQ's packed
codes, an onloaded block cast back), the old storage is freed, but its pages stay mapped and
resident until the whole file is unmapped: by the end of a stage, the whole stored model. This
module hands them back with ``madvise(MADV_DONTNEED)``, the way llama.cpp drops mapped weights
it no longer needs.

Only pages that lie wholly inside a storage that was freed (a ``StorageWeakRef`` that
expired) and inside a file mapping are dropped, and never a page that a live tensor of the
model still views: the bytes are no longer readable by anyone, so dropping them changes no
value (a later access would read the file again). Anonymous memory is never touched — the
allocator may have reused it. Off Linux (no ``/proc/self/maps``) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MADV_DONTNEED = 4
_Range = tuple[int, int]  # [start, end) addresses
_Mapping = tuple[int, int, str]  # start, end, device:inode


def file_mappings() -> list[_Mapping]:
    """This process's file-backed mappings (``/proc/self/maps`` entries with an inode and a
    path): their address range and file identity."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
            start, end = (int(a, 16) for a in parts[0].split("-"))
            found.append((start, end, f"{parts[3]}:{parts[4]}"))
    return found


def _storage_range(tensor: Any) -> _Range:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _mapping_of(span: _Range, mappings: list[_Mapping]) -> _Mapping | None:
    return next((m for m in mappings if m[0] <= span[0] and span[1] <= m[1]), None)


class MappedStorages:
    """The storages of ``tensors`` that view a file mapping, held weakly; :meth:`release`
    drops the pages of those freed since (``tensors``: any CPU tensors)."""

    def __init__(self, tensors: Iterable[Any]) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        mappings = file_mappings()
        self.records: list[tuple[Any, _Range, _Mapping]] = []
        if not mappings:
            return
        seen: set[int] = set()
        for tensor in tensors:
            if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() < mmap.PAGESIZE:
                continue
            span = _storage_range(tensor)
            mapping = _mapping_of(span, mappings)
            if span[0] not in seen and mapping is not None:
                seen.add(span[0])
                self.records.append((StorageWeakRef(tensor.untyped_storage()), span, mapping))

    def release(self, live: Iterable[Any]) -> int:
        """Drop the pages of every recorded storage that was freed, except pages a tensor in
        ``live`` (the whole model) still views; returns the bytes dropped."""
        freed = [(span, mapping) for ref, span, mapping in self.records if ref.expired()]
        self.records = [r for r in self.records if not r[0].expired()]
        # the very mapping still there: one a freed storage owned is unmapped, and its
        # addresses may since hold other memory
        current = set(file_mappings())
        freed = [span for span, mapping in freed if mapping in current]
        if not freed:
            return 0
        kept = sorted(_storage_range(t) for t in live if t.device.type == "cpu")
        dropped = 0
        for start, end in freed:
            for a, b in _minus((start, end), kept):
                dropped += _dontneed(a, b)
        return dropped


def _minus(span: _Range, kept: list[_Range]) -> list[_Range]:
    """``span`` less every range in ``kept``."""
    parts = [span]
    for k0, k1 in kept:
        parts = [p for a, b in parts for p in ((a, min(b, k0)), (max(a, k1), b)) if p[0] < p[1]]
    return parts


def _dontneed(start: int, end: int) -> int:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside ``[start, end)``."""
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = end // page * page
    if last <= first:
        return 0
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED):
            return 0
        return last - first
    return 0
