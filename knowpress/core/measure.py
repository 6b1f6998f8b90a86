"""Measurements the runner takes around each stage: peak memory, content hashes."""

from __future__ import annotations

import hashlib
import json
import resource
import threading
from pathlib import Path
from types import TracebackType
from typing import Any


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory (bytes) of this process while the block runs, sampled every
    ``interval`` seconds (``ru_maxrss`` is a lifetime peak and cannot isolate one stage)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``):
    tensors below glibc's mmap threshold (which grows to 32 MB) are freed into the heap and
    would otherwise stay resident, inflating every later peak. A no-op off glibc."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's ``malloc_trim``: freed heap pages back to the OS (no garbage collection, so
    cheap enough to call after every module a loop rebuilds). A no-op off glibc."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON, truncated."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def directory_fingerprint(directory: Path) -> str:
    """Cheap identity of a model directory: names, sizes and mtimes of its files."""
    entries = [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(Path(directory).iterdir())
        if f.is_file()
    ]
    return stable_hash(entries)
