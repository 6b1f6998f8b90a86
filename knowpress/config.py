"""The base of every validated config: frozen, unknown fields rejected, self-describing."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class FrozenConfig(BaseModel):
    """Stage kinds and methods subclass this; ``summary`` and ``paper`` feed ``compress list``
    and the README's method table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
