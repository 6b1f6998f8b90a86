"""Test helpers: tiny, seeded, CPU-only objects built in seconds (no downloads)."""

from __future__ import annotations

from pathlib import Path

from knowpress.teachers import build_teacher
from knowpress.testing.models import tiny_llama
from knowpress.worlds import PRESETS, World, generate_world

__all__ = ["tiny_llama", "tiny_teacher", "tiny_world"]


def tiny_world() -> World:
    """The ``test-tiny`` preset's world (32 people x 3 attributes)."""
    return generate_world(PRESETS.get("test-tiny").world)


def tiny_teacher(cache_dir: Path) -> Path:
    """A trained ``test-tiny`` teacher directory under ``cache_dir`` (~10 s the first time)."""
    return build_teacher("test-tiny", cache_dir=cache_dir, progress=False)
