"""core/pages.py: the pages of freed file-mapped storages leave RSS; nothing else does."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from knowpress.core.pages import MappedStorages, _minus, file_mappings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps is Linux's")
MB = 1 << 20


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def _mapped(path: Path, nbytes: int) -> tuple[mmap.mmap, torch.Tensor, torch.Tensor]:
    """Two storages over one private file mapping, as transformers views a safetensors file:
    the first ``nbytes`` and the rest (one page)."""
    path.write_bytes(bytes(range(256)) * ((nbytes + 4096) // 256))
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    first = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)
    rest = torch.frombuffer(mapping, dtype=torch.uint8, offset=nbytes)
    return mapping, first, rest


def test_freed_mapped_storage_pages_leave_rss(tmp_path: Path) -> None:
    _mapping, tensor, rest = _mapped(tmp_path / "w.bin", 16 * MB)
    assert int(tensor[::4096].sum()) == 0  # every page read (each starts at byte 0): resident
    pages = MappedStorages([tensor])
    assert len(pages.records) == 1
    before = _rss_file()
    kept = pages.release([tensor])  # alive: kept
    assert kept == 0
    del tensor
    dropped = pages.release([])
    assert 16 * MB - 2 * 4096 <= dropped <= 16 * MB
    assert before - _rss_file() >= 15 * MB
    assert int(rest[1]) == 1  # the mapping's other storage is untouched


def test_a_storage_that_owned_its_mapping_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(bytes(4 * MB))
    tensor = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=4 * MB, dtype=torch.uint8)
    pages = MappedStorages([tensor])
    del tensor  # unmapped with it: its addresses may hold other memory now
    assert pages.release([]) == 0


def test_a_view_keeps_the_storage_and_anonymous_memory_is_never_recorded(tmp_path: Path) -> None:
    _mapping, tensor, _rest = _mapped(tmp_path / "w.bin", 4 * MB)
    view = tensor[MB + 7 :]
    pages = MappedStorages([tensor, torch.zeros(4 * MB, dtype=torch.uint8)])
    assert len(pages.records) == 1  # the anonymous tensor is not in a file mapping
    del tensor
    assert pages.release([]) == 0  # the view holds the storage
    assert int(view[0]) == 7
    assert file_mappings()


def test_live_ranges_are_cut_out() -> None:
    assert _minus((0, 100), [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert _minus((0, 100), [(0, 100)]) == []
    assert _minus((0, 100), [(200, 300)]) == [(0, 100)]
