"""User-facing errors.

Every problem a user can fix (a bad recipe field, a missing model directory, an existing
output folder) is raised as a :class:`KnowpressError` whose message is one line per problem,
naming the field or path and the fix. The CLI prints these without a traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

#: the most characters of a user's value an error line repeats
ECHO_CHARS = 200


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters (a 50 MB string is not echoed whole)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def yaml_value(value: Any) -> str:
    """A value as a recipe wrote it, with its YAML type: ``true (a boolean)``, ``4.0 (a
    decimal)``; containers by kind, strings quoted and cut to :data:`ECHO_CHARS`."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"{value!r} ({'a whole number' if isinstance(value, int) else 'a decimal'})"
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    return "null" if value is None else short(repr(value))


def error_summary(exc: BaseException, limit: int = ECHO_CHARS) -> str:
    """A library error in one line: its first line (with the next when the first ends in a
    colon, as in "Validation error for field 'x':"), or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return short(text, limit)


class KnowpressError(Exception):
    """An error the user can fix; ``str(err)`` is the message to show."""


class RecipeError(KnowpressError):
    """A recipe that does not validate. ``lines`` holds one line per bad field."""

    def __init__(self, lines: list[str], source: str | None = None) -> None:
        self.lines = lines
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + line for line in lines))


_FULL_MARKS = ("No space left", "StorageFull", "code: 28", "[Errno 28]", "ENOSPC")


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: an ``OSError``
    with ``ENOSPC``, or a library's own error saying so (safetensors' ``StorageFull``,
    onnx / protobuf messages)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and errno.ENOSPC in (exc.errno, *exc.args[:1]):
            return True
        if any(mark in str(exc) for mark in _FULL_MARKS):
            return True
        exc = exc.__cause__ if exc.__suppress_context__ else exc.__cause__ or exc.__context__
    return False


#: free bytes under which an ``OSError`` without an errno counts as a full disk (numpy's
#: ``tofile`` under onnx's external-data writer says only "problem writing element N")
NEARLY_FULL = 1 << 20


def full_disk_error(exc: BaseException, written: Path, final: Path) -> OSError | None:
    """``OSError(ENOSPC, final)`` when ``exc`` means the disk filled up while ``written`` was
    written (a library's own error type or message, or an errno-less ``OSError`` on a disk
    left with under :data:`NEARLY_FULL` bytes); else None."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and exc.filename:
        return None  # names its file already (an atomic_file inside an atomic_dir)
    full = disk_full(exc)
    if not full and isinstance(exc, OSError) and exc.errno is None:
        try:
            stats = os.statvfs(written if written.exists() else written.parent)
            full = stats.f_bavail * stats.f_frsize < NEARLY_FULL
        except OSError:
            full = False
    return OSError(errno.ENOSPC, "No space left on device", str(final)) if full else None
