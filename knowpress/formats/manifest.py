"""The artifact manifest: ``knowpress_artifact.json`` in every stage folder.

What a stage produced, in one validated record, written last and atomically with the rest of
the folder (the runner's ``atomic_dir``) and read back on resume and by ``load_runtime``::

    {"schema": "knowpress.artifact", "version": 1,
     "format": "hf" | "hf-packed" | "onnx" ...,   # which runtime loader scores it
     "dtype": "bfloat16",                         # tensors no stage compressed are stored in it
     "files": {"model.safetensors": 525312},      # the payload: every byte counted as stored
     "sha256": {"model.safetensors": "9f2c..."},  # of each payload file, checked on resume
     "metadata": {"config.json": 714, ...},       # config, tokenizer, records: listed, not counted
     "artifacts": {"policy_table": "table.bin"},  # payload files a stage named (among `files`)
     "runtime": {"kv_policy": {"name": "full"}},  # policies the runtime applies, by slot
     "structure": {"experts_per_layer": [8, 6]},  # per-layer facts a loader needs
     "stored_bytes": 525312}

Stored bytes are the payload a deployment ships: weights (every shard of a sharded folder and
its ``model.safetensors.index.json``) and every non-metadata file (ONNX graphs and external
data, policy tables). Config and tokenizer files are the same for every
row of a report, so they are listed but not counted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError

MANIFEST_FILE = "knowpress_artifact.json"
METADATA_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.*", "merges.txt", "chat_template*", "knowpress_*.json",
    "eval.json", "*.py", "README*", "LICENSE*",
)  # fmt: skip


class Manifest(FrozenConfig):
    """One stage output, as described in the module docstring."""

    schema_: Literal["knowpress.artifact"] = Field("knowpress.artifact", alias="schema")
    version: Literal[1] = 1
    format: str
    #: why the artifact is in knowpress's own format (no public format holds it), else None
    format_reason: str | None = None
    dtype: str
    files: dict[str, int]
    sha256: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, int] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    runtime: dict[str, dict[str, Any]] = Field(default_factory=dict)
    structure: dict[str, Any] = Field(default_factory=dict)
    stored_bytes: int

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def is_metadata(name: str) -> bool:
    """Config, tokenizer and knowpress record files: not part of the stored payload."""
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, pattern) for pattern in METADATA_PATTERNS)


def _listing(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def build_manifest(
    directory: Path,
    *,
    format: str,
    dtype: str,
    artifacts: dict[str, str] | None = None,
    runtime: dict[str, dict[str, Any]] | None = None,
    structure: dict[str, Any] | None = None,
    format_reason: str | None = None,
) -> Manifest:
    """Describe the files now in ``directory``; every named artifact must be among them."""
    listing = _listing(Path(directory))
    files = {name: size for name, size in listing.items() if not is_metadata(name)}
    for name, file in (artifacts or {}).items():
        if file not in files:
            where = "is a metadata file name" if file in listing else "is not in the stage folder"
            raise KnowpressError(f"artifact {name!r}: {file} {where}; write it into ctx.stage_dir")
    return Manifest(
        format=format,
        format_reason=format_reason,
        dtype=dtype,
        files=files,
        sha256={name: file_sha256(Path(directory) / name) for name in files},
        metadata={n: s for n, s in listing.items() if n not in files},
        artifacts=dict(artifacts or {}),
        runtime=dict(runtime or {}),
        structure=dict(structure or {}),
        stored_bytes=sum(files.values()),
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    from knowpress.core.io import atomic_write_text

    text = json.dumps(manifest.dump(), indent=1, sort_keys=True)
    atomic_write_text(Path(directory) / MANIFEST_FILE, text)


def read_manifest(directory: Path) -> Manifest | None:
    """The folder's manifest, or None when it has none (a teacher or user model folder)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KnowpressError(
            f"{path}: not a valid artifact manifest ({first}); re-run the stage that wrote it"
        ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(directory: Path, manifest: Manifest, content: bool = True) -> list[str]:
    """Payload files missing, of another size, or (``content``) of another sha256 than when
    the manifest was written."""
    problems = []
    for name, size in manifest.files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
        elif content and name in manifest.sha256 and file_sha256(path) != manifest.sha256[name]:
            problems.append(f"{name} changed since it was written (sha256 differs)")
    return problems


def stored_bytes(directory: Path) -> int:
    """Bytes of the stored payload: the manifest's files (checked on disk), or for a folder
    without a manifest its weight files (every shard) and their index."""
    from knowpress.formats.shards import weight_bytes
    from knowpress.formats.sizes import safetensors_files

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        safetensors_files(directory)  # none is one line
        return weight_bytes(directory)
    problems = changed_files(directory, manifest, content=False)
    if problems:
        raise KnowpressError(
            f"{directory}: {problems[0]} (changed since it was written); re-run its stage"
        )
    return manifest.stored_bytes
