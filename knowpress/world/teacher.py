"""Build (or fetch from the cache) a teacher that has memorised a world; load worlds back.

Cache layout: ``{root}/teachers/{preset.name}-{preset.key()}/`` with ``root = cache_dir or
default_cache_dir()``. A teacher directory holds ``model.safetensors`` + ``config.json`` +
``generation_config.json`` (``save_pretrained``), the tokenizer files, and
``knowpress_world.json``::

    {"format": 1, "preset": name, "preset_key": key, "world_key": ..., "world_fingerprint": ...,
     "world": {WorldConfig},
     "architecture": "llama" | "mixtral" | ..., "model": {config kwargs},
     "train_config": {TrainConfig},
     "train": {"steps", "final_loss", "seconds", "recall", "scores": {task: score}}}

``train.seconds`` is training time only; ``train.scores`` holds every applicable knowledge
task's teacher score (``training.teacher_tasks``) measured right after training.

``knowpress_world.json`` is written last and the directory is trained in a temporary
sibling, then renamed into place, so a directory at the final path is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import ValidationError

from knowpress.errors import KnowpressError
from knowpress.registry import close_matches
from knowpress.world.config import WorldConfig
from knowpress.world.facts import FactsWorld, FactsWorldConfig, build_facts_world
from knowpress.world.generator import World, generate_world
from knowpress.world.presets import PRESETS, Preset
from knowpress.world.tokenizer import build_tokenizer

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


def build_teacher(
    preset: str | Preset,
    cache_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Path of a trained teacher for ``preset``: cached if present, else trained now on
    ``device`` (cpu, or cuda when a GPU is present).

    ``force`` retrains from scratch and replaces a cached teacher. Training happens in a
    temporary sibling directory that is renamed into place only when complete
    (``atomic_dir``); meanwhile the training state is saved beside it every minute
    (``resume_file``), so an interrupted build resumes where it stopped.
    """
    p = resolve_preset(preset)
    final = teacher_dir(p, cache_dir)
    if is_complete(final) and not force:
        return final
    from knowpress.models.io import atomic_dir  # torch only when building

    checkpoint = resume_file(final)
    if force:
        checkpoint.unlink(missing_ok=True)
    init = _base_teacher(p, cache_dir, progress, device)
    with atomic_dir(final) as tmp:  # a complete directory, or none, at ``final``
        _train_into(p, tmp, progress, checkpoint, device, init)
    checkpoint.unlink(missing_ok=True)
    return final


def resume_file(final: Path) -> Path:
    """Where an unfinished build of the teacher at ``final`` keeps its training state."""
    return final.parent / f".resume-{final.name}.safetensors"


def _base_teacher(
    preset: Preset, cache_dir: Path | None, progress: bool, device: str
) -> Path | None:
    """The built teacher ``preset.train.init_from`` names (built first when missing), after
    checking it has the same world, architecture and model; None without ``init_from``."""
    if preset.train.init_from is None:
        return None
    base = resolve_preset(preset.train.init_from)
    same = (base.world, base.architecture, base.model) == (
        preset.world, preset.architecture, preset.model)  # fmt: skip
    if not same:
        raise KnowpressError(
            f"preset {preset.name!r}: train.init_from {base.name!r} has another world, "
            "architecture or model; init_from needs a teacher of the same shapes and facts"
        )
    return build_teacher(base, cache_dir, progress=progress, device=device)


def _train_into(
    preset: Preset, out: Path, progress: bool, checkpoint: Path | None, device: str,
    init: Path | None = None,
) -> None:  # fmt: skip
    from knowpress.models.io import save_model
    from knowpress.world.training import train_teacher  # torch only when training

    world = make_world(preset.world)
    max_positions = int(preset.model.get("max_position_embeddings", 2048))
    tokenizer = build_tokenizer(world, model_max_length=max_positions)
    result = train_teacher(
        preset, world, tokenizer, progress=progress, checkpoint=checkpoint, device=device,
        init=init,
    )  # fmt: skip
    save_model(result.model, tokenizer, out)
    record = {
        "format": FORMAT_VERSION,
        "preset": preset.name,
        "preset_key": preset.key(),
        "world_key": preset.world.key(),
        "world_fingerprint": world.fingerprint(),
        "world": preset.world.model_dump(mode="json"),
        "architecture": preset.architecture,
        "model": preset.model,
        "train_config": preset.train.model_dump(mode="json"),
        "train": {
            "steps": result.steps,
            "final_loss": round(result.final_loss, 6),
            "seconds": round(result.seconds, 2),
            "device": device,
            "recall": result.recall,
            "scores": result.scores,
        },
    }
    # Written last: its presence marks the directory complete.
    (out / WORLD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


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
