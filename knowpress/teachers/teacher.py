"""Build (or fetch from the cache) a teacher that has memorised a world.

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
from pathlib import Path

from knowpress.core.errors import KnowpressError
from knowpress.worlds.presets import Preset
from knowpress.worlds.store import (
    FORMAT_VERSION,
    WORLD_FILE,
    is_complete,
    make_world,
    resolve_preset,
    teacher_dir,
)
from knowpress.worlds.tokenizer import build_tokenizer


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
    from knowpress.core.io import atomic_dir  # torch only when building

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
    from knowpress.formats.io import save_model
    from knowpress.teachers.training import train_teacher  # torch only when training

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
