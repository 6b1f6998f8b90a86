"""Fact worlds: synthetic bioS-style people and real facts, their tokenizer and presets.

``generate_world(cfg)`` builds a deterministic world; ``build_tokenizer(world)`` a word-level
tokenizer for it; ``load_world(path_or_preset)`` gets a world back from a teacher folder or a
preset name (``store.py``). Training the teachers that memorise them is ``knowpress.teachers``'.
"""

from __future__ import annotations

from knowpress.worlds.config import SUPPORTED_ATTRIBUTES, WORLD_VERSION, PoolSizes, WorldConfig
from knowpress.worlds.generator import Person, QAItem, World, generate_world, value_pool
from knowpress.worlds.presets import PRESETS, Preset, TrainConfig
from knowpress.worlds.store import (
    WORLD_FILE,
    default_cache_dir,
    load_world,
    make_world,
    teacher_dir,
    teacher_info,
)
from knowpress.worlds.tokenizer import build_tokenizer

__all__ = [
    "PRESETS",
    "SUPPORTED_ATTRIBUTES",
    "WORLD_FILE",
    "WORLD_VERSION",
    "Person",
    "PoolSizes",
    "Preset",
    "QAItem",
    "TrainConfig",
    "World",
    "WorldConfig",
    "build_tokenizer",
    "default_cache_dir",
    "generate_world",
    "load_world",
    "make_world",
    "teacher_dir",
    "teacher_info",
    "value_pool",
]
