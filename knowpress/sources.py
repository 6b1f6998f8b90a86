"""Resolve a recipe's model spec to something loadable, with a stable identity for resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from knowpress.errors import KnowpressError
from knowpress.measure import directory_fingerprint, stable_hash
from knowpress.models.io import load_model, stored_bytes
from knowpress.recipe import ModelSpec
from knowpress.world.teacher import WORLD_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["WORLD_FILE", "Source", "resolve_source"]


@dataclass(frozen=True)
class Source:
    """``location`` is what ``load_model`` takes; ``key`` changes whenever the weights do."""

    location: str
    key: str
    spec: ModelSpec

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.location)
        return path if path.is_dir() else None

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer, with the spec's dtype and remote-code setting."""
        return load_model(
            self.location, dtype=self.spec.dtype, trust_remote_code=self.spec.trust_remote_code
        )

    def stored_bytes(self) -> int:
        """Bytes of the weight files behind this source (local dir or the hub cache)."""
        if self.local_dir is not None:
            return stored_bytes(self.local_dir)
        from transformers.utils import cached_file

        config = cached_file(self.location, "config.json", local_files_only=True)
        if config is None:
            raise KnowpressError(f"model {self.location!r}: not in the local hub cache")
        return stored_bytes(Path(config).parent)


def resolve_source(spec: ModelSpec, build: bool = True, progress: bool = False) -> Source:
    """A world preset resolves to its cached (built on demand) teacher directory."""
    if spec.world is not None:
        from knowpress.world import PRESETS, build_teacher

        preset = PRESETS.get(spec.world)
        location = (
            str(build_teacher(preset, progress=progress)) if build else f"<world:{spec.world}>"
        )
        return Source(location, stable_hash(["world", spec.world, preset.key(), spec.dtype]), spec)
    assert spec.path is not None
    path = Path(spec.path).expanduser()
    if path.is_dir():
        key = stable_hash(["path", str(path.resolve()), directory_fingerprint(path), spec.dtype])
        return Source(str(path), key, spec)
    if spec.path.startswith((".", "/", "~")):
        raise KnowpressError(f"model.path: {spec.path} does not exist (give an HF model dir)")
    return Source(spec.path, stable_hash(["hub", spec.path, spec.dtype]), spec)
