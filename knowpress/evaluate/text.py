"""A user's own held-out text (``evaluate.text``): what ``kl`` and ``perplexity`` read.

```yaml
evaluate:
  tasks: [kl, perplexity]
  text: {path: notes.txt}                                  # paragraphs split at blank lines
  # text: {path: data.jsonl, field: text, max_tokens: 50000}   # one JSON object per line
```

Without a fact world the run measures only this text (``TextWorld``: tasks that ask a fact
world's questions are refused before the run starts); with one, the text replaces the
world's held-out text (``WithText``). ``max_tokens`` caps the tokens ``kl`` scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError, short
from knowpress.core.measure import stable_hash

MAX_TEXT_BYTES = 200_000_000


class TextSpec(FrozenConfig):
    path: str = Field(description="a .txt (paragraphs) or .jsonl / .json file")
    field: str = Field("text", description="the string field of each JSON record")
    max_tokens: int = Field(50_000, gt=0, description="tokens kl scores at most")


class TextConfig(FrozenConfig):
    """What the report records of the text: where it came from and its content hash."""

    path: str
    field: str
    max_tokens: int
    sha256: str
    texts: int

    def key(self) -> str:
        return stable_hash(["text", self.sha256, self.field, self.max_tokens])


def _records(raw: str, path: Path, field: str) -> list[str]:
    if path.suffix == ".json":
        try:
            rows: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise KnowpressError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not isinstance(rows, list):
            raise KnowpressError(f"{path}: expected a JSON list of strings or records")
        return [_field(row, path, i + 1, field) for i, row in enumerate(rows)]
    out = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KnowpressError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            out.append(_field(row, path, number, field))
    return out


def _field(row: Any, path: Path, number: int, field: str) -> str:
    if isinstance(row, dict) and isinstance(row.get(field), str):
        row = row[field]
    if not isinstance(row, str):
        raise KnowpressError(
            f"{path}:{number}: no string field {short(field, 40)!r} (set evaluate.text.field)"
        )
    if "\x00" in row:  # a \u0000 escape: tokenizers stop or fail on it
        raise KnowpressError(f"{path}:{number}: the text holds a NUL character (\\u0000)")
    return row


def load_texts(spec: TextSpec, what: str = "evaluate.text") -> tuple[list[str], TextConfig]:
    """The non-empty texts of ``spec.path`` and the record of what was read; ``what`` names
    the setting in error lines (``evaluate.text``, ``data.calibration``, ``--text``)."""
    path = Path(spec.path).expanduser()
    where = f"{what}.path" if what[0].isalpha() else what
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise KnowpressError(f"{where}: {spec.path} {problem} (give a .txt or .jsonl)")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise KnowpressError(f"{where}: {spec.path} is over 200 MB; give a sample")
    data = path.read_bytes()
    if b"\x00" in data:
        raise KnowpressError(
            f"{where}: {spec.path} is not a text file (a NUL byte at offset {data.index(0)}); "
            f"give UTF-8 text"
        )
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KnowpressError(f"{where}: {path} is not UTF-8 text (offset {exc.start})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = [t.strip() for t in _records(raw, path, spec.field)]
    else:
        texts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise KnowpressError(f"{where}: {spec.path} holds no text")
    config = TextConfig(
        path=str(path),
        field=spec.field,
        max_tokens=spec.max_tokens,
        sha256=hashlib.sha256(data).hexdigest(),
        texts=len(texts),
    )
    return texts, config


class TextWorld:
    """A world that is only held-out text (no facts): for ``kl`` and ``perplexity``."""

    def __init__(self, texts: list[str], config: TextConfig) -> None:
        self.texts, self.config = texts, config
        self.max_tokens = config.max_tokens

    def heldout_texts(self) -> list[str]:
        return list(self.texts)


class WithText:
    """A fact world whose held-out text is the user's (everything else is the world's)."""

    def __init__(self, world: Any, text: TextWorld) -> None:
        self._world, self.text = world, text
        self.max_tokens = text.max_tokens

    def heldout_texts(self) -> list[str]:
        return self.text.heldout_texts()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._world, name)


def has_facts(world: Any) -> bool:
    return not isinstance(world, TextWorld)


def world_record(world: Any) -> dict[str, Any]:
    """``{"key", "config"}`` of what a run measured, for the report (the key a baseline must
    share): the fact world's, the text's, or both combined."""
    if isinstance(world, WithText):
        facts, text = world.config, world.text.config
        key = stable_hash([facts.key(), text.key()])
        return {"key": key, "config": facts.model_dump(mode="json"), "text": text.model_dump()}
    record = {"key": world.config.key(), "config": world.config.model_dump(mode="json")}
    if isinstance(world, TextWorld):
        record["text"] = world.config.model_dump()
    return record
