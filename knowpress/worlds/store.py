"""Where fact worlds and their teachers are found: the teacher cache (``$KNOWPRESS_CACHE``),
a teacher folder's world file (``knowpress_world.json``), and the world a folder or a preset
name describes (``load_world``). Building a teacher is ``teachers/teacher.py``'s."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import ValidationError

from knowpress.core.errors import KnowpressError
from knowpress.core.registry import close_matches
from knowpress.worlds.config import WorldConfig
from knowpress.worlds.facts import FactsWorld, FactsWorldConfig, build_facts_world
from knowpress.worlds.generator import World, generate_world
from knowpress.worlds.presets import PRESETS, Preset

WORLD_FILE = "knowpress_world.json"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$KNOWPRESS_CACHE`` when set, else the platform user cache dir for ``knowpress``."""
    env = os.environ.get("KNOWPRESS_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("knowpress"))


def resolve_preset(preset: str | Preset) -> Preset:
    """A ``Preset`` as is, or the registered preset of that name (unknown -> KnowpressError)."""
    return preset if isinstance(preset, Preset) else PRESETS.get(preset)


def teacher_dir(preset: str | Preset, cache_dir: Path | None = None) -> Path:
    """Where ``build_teacher`` keeps ``preset``'s teacher (it may not exist yet)."""
    p = resolve_preset(preset)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "teachers" / f"{p.name}-{p.key()}"


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished teacher directory (its world file exists)."""
    return (path / WORLD_FILE).is_file()


def teacher_info(path: str | Path) -> dict[str, Any]:
    """The parsed ``knowpress_world.json`` of a teacher directory (or the file itself)."""
    path = Path(path)
    file = path / WORLD_FILE if path.is_dir() else path
    if not file.is_file():
        raise KnowpressError(_not_found_message(path))
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KnowpressError(
            f"{file}: unreadable world file ({err}); rebuild the teacher with build_teacher"
        ) from None
    if not isinstance(record, dict) or "world" not in record:
        raise KnowpressError(f"{file}: no 'world' entry; rebuild the teacher with build_teacher")
    return record


def make_world(config: WorldConfig | FactsWorldConfig) -> World | FactsWorld:
    """The world a config describes: synthetic bioS, or real facts (JSONL file / LRE)."""
    if isinstance(config, FactsWorldConfig):
        return build_facts_world(config)
    return generate_world(config)


def load_world(path_or_preset: str | Path) -> World | FactsWorld:
    """The world of a teacher directory (its ``knowpress_world.json``) or of a preset name."""
    is_preset = isinstance(path_or_preset, str) and path_or_preset in PRESETS
    if is_preset and not Path(path_or_preset).exists():  # a local directory of that name wins
        return make_world(PRESETS.get(str(path_or_preset)).world)
    record = teacher_info(path_or_preset)
    try:
        data = record["world"]
        is_facts = isinstance(data, dict) and data.get("kind") == "facts"
        config = (FactsWorldConfig if is_facts else WorldConfig).model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "world"
        raise KnowpressError(
            f"{path_or_preset}: invalid world config at {where}: {first['msg']}; "
            "rebuild the teacher with build_teacher"
        ) from None
    world = make_world(config)
    expected = record.get("world_fingerprint")
    if expected is not None and world.fingerprint() != expected:
        raise KnowpressError(
            f"{path_or_preset}: this knowpress version regenerates a different world than the "
            "teacher was trained on; rebuild it with build_teacher(..., force=True)"
        )
    return world


def _not_found_message(path: Path) -> str:
    presets = PRESETS.names()
    hint = close_matches(str(path), presets)
    did_you_mean = f"did you mean preset {' or '.join(repr(h) for h in hint)}? " if hint else ""
    return (
        f"{path}: not a teacher directory (no {WORLD_FILE}) nor a preset name; {did_you_mean}"
        f"build one with `build_teacher` or use a preset ({', '.join(presets)})"
    )
