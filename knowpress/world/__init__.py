"""Fact worlds: synthetic bioS-style people, their tokenizer, and teachers that memorised them.

``generate_world(cfg)`` builds a deterministic world; ``build_tokenizer(world)`` a word-level
tokenizer for it; ``build_teacher("bios-dense-tiny")`` trains (or fetches from the cache) a
tiny Llama that recalls every fact; ``load_world(path_or_preset)`` gets a world back.
"""

from __future__ import annotations

from knowpress.world.config import SUPPORTED_ATTRIBUTES, WORLD_VERSION, PoolSizes, WorldConfig
from knowpress.world.generator import Person, QAItem, World, generate_world, value_pool
from knowpress.world.presets import PRESETS, Preset, TrainConfig
from knowpress.world.teacher import (
    WORLD_FILE,
    build_teacher,
    default_cache_dir,
    load_world,
    make_world,
    teacher_dir,
    teacher_info,
)
from knowpress.world.tokenizer import build_tokenizer

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
    "build_teacher",
    "build_tokenizer",
    "default_cache_dir",
    "generate_world",
    "load_world",
    "make_world",
    "teacher_dir",
    "teacher_info",
    "value_pool",
]
