"""User-facing errors.

Every problem a user can fix (a bad recipe field, a missing model directory, an existing
output folder) is raised as a :class:`KnowpressError` whose message is one line per problem,
naming the field or path and the fix. The CLI prints these without a traceback.
"""

from __future__ import annotations

from typing import Any

#: the most characters of a user's value an error line repeats
ECHO_CHARS = 200


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters (a 50 MB string is not echoed whole)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class KnowpressError(Exception):
    """An error the user can fix; ``str(err)`` is the message to show."""


class RecipeError(KnowpressError):
    """A recipe that does not validate. ``lines`` holds one line per bad field."""

    def __init__(self, lines: list[str], source: str | None = None) -> None:
        self.lines = lines
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + line for line in lines))
