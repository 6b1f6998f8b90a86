"""Files written so that an interruption leaves each complete or absent: a temporary
sibling renamed into place (``atomic_dir``, ``atomic_file``, ``atomic_write_text``), with the
mode a plain ``open`` gives (``follow_umask``) and a full disk named in one line."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from knowpress.core.errors import full_disk_error


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only on success.

    A crash or Ctrl-C inside the block, or during the swap, leaves ``final`` as it was (old
    content or absent) and removes the temporary directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    old: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as exc:
        full = full_disk_error(exc, tmp, final)  # before the temporary's bytes are freed
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # interrupted between the two renames: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (``.tmp-NAME.*``, same suffix) to write; rename it
    to ``path`` only on success and remove it on any failure, so ``path`` is complete or
    untouched. The file gets the mode a plain ``open`` would (0666 minus the umask), not
    ``mkstemp``'s 0600: reports are CI artifacts other users read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = full_disk_error(exc, tmp, path)  # named by the file it replaces
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


def follow_umask(path: Path) -> None:
    """Give a file written through a temporary (``mkstemp``: 0600) the mode a plain
    ``open`` would: 0666 minus the umask."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through ``atomic_file``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
