"""Resolve a recipe's model spec to something loadable, with a stable identity for resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from knowpress.core.device import resolve_compute_dtype
from knowpress.core.errors import KnowpressError
from knowpress.core.measure import directory_fingerprint, stable_hash
from knowpress.core.specs import ModelSpec
from knowpress.formats.io import load_model
from knowpress.formats.manifest import stored_bytes
from knowpress.formats.sizes import bf16_bytes
from knowpress.worlds.store import WORLD_FILE

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

    def load(
        self, device: str = "cpu", follow: str | None = None
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer, in the spec's compute dtype, on ``device``: its ``auto``
        follows ``follow`` (the run's resolved compute dtype) when given, else the device."""
        import torch

        dtype = self.spec.compute_dtype
        if dtype == "auto":
            dtype = follow or resolve_compute_dtype(dtype, torch.device(device))
        return load_model(
            self.location,
            dtype=dtype,
            trust_remote_code=self.spec.trust_remote_code,
            device=device,
        )

    def folder(self) -> Path:
        """The local folder behind this source (a directory, or the hub cache's snapshot)."""
        if self.local_dir is not None:
            return self.local_dir
        from transformers.utils import cached_file

        config = cached_file(self.location, "config.json", local_files_only=True)
        if config is None:
            raise KnowpressError(f"model {self.location!r}: not in the local hub cache")
        return Path(config).parent

    def stored_bytes(self) -> int:
        """Bytes of the payload behind this source (see ``models.artifact.stored_bytes``)."""
        return stored_bytes(self.folder())

    def bf16_bytes(self) -> int:
        """Bytes its safetensors would take with every float tensor in bfloat16."""
        return bf16_bytes(self.folder())


def resolve_source(
    spec: ModelSpec, build: bool = True, progress: bool = False, field: str = "model.path"
) -> Source:
    """A world preset resolves to its cached (built on demand) teacher directory."""
    if spec.world is not None:
        from knowpress.teachers import build_teacher
        from knowpress.worlds import PRESETS

        preset = PRESETS.get(spec.world)
        location = (
            str(build_teacher(preset, progress=progress)) if build else f"<world:{spec.world}>"
        )
        key = stable_hash(["world", spec.world, preset.key(), spec.compute_dtype])
        return Source(location, key, spec)
    assert spec.path is not None
    path = Path(spec.path).expanduser()
    if path.is_dir():
        fingerprint = directory_fingerprint(path)
        key = stable_hash(["path", str(path.resolve()), fingerprint, spec.compute_dtype])
        return Source(str(path), key, spec)
    if spec.path.startswith((".", "/", "~")):
        raise KnowpressError(f"{field}: {spec.path} does not exist (give an HF model dir)")
    if build:
        _check_hub(spec.path, field)
    return Source(spec.path, stable_hash(["hub", spec.path, spec.compute_dtype]), spec)


def _check_hub(repo: str, field: str) -> None:
    """A hub id must be in the local cache or the hub reachable: fail in one line at once
    instead of transformers' minute of retries on an offline machine."""
    import os
    import socket
    from urllib.parse import urlparse

    from transformers.utils import cached_file

    try:
        cached = cached_file(repo, "config.json", local_files_only=True,
                             _raise_exceptions_for_missing_entries=False)  # fmt: skip
    except (OSError, ValueError):
        cached = None
    if cached is not None:
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError:
            pass
    raise KnowpressError(
        f"{field}: {repo!r} is not a local folder nor in the Hugging Face cache, and {host} "
        f"cannot be reached from here; download it where there is network, then give its folder"
    )
