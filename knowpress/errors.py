"""User-facing errors.

Every problem a user can fix (a bad recipe field, a missing model directory, an existing
output folder) is raised as a :class:`KnowpressError` whose message is one line per problem,
naming the field or path and the fix. The CLI prints these without a traceback.
"""

from __future__ import annotations


class KnowpressError(Exception):
    """An error the user can fix; ``str(err)`` is the message to show."""


class RecipeError(KnowpressError):
    """A recipe that does not validate. ``lines`` holds one line per bad field."""

    def __init__(self, lines: list[str], source: str | None = None) -> None:
        self.lines = lines
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + line for line in lines))
