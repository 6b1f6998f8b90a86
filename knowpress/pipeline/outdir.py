"""The output folder of a run: what may be replaced, who may write it, what is swept.

Rules (``compress apply -o OUT``):

- A knowpress run folder holds :data:`RUN_MARKER`, which only knowpress writes (a file named
  ``recipe.yaml`` marks nothing: a project folder holds one too).
- An existing non-empty OUT is an error unless ``--resume`` (it must be a run) or
  ``--force``, which only ever replaces a run folder, and only once the new run reaches its
  first write (sources resolved, world loaded, plan checked): a run that fails before that
  leaves the old one as it was. User files in a folder that is not a run are never deleted.
- OUT is never an input of the run, a folder holding one, or a folder inside one
  (:func:`check_not_input`: the model, reference, teacher, a stage's own models, text and
  calibration files, caches): a forced run would delete what it reads.
- ``compress export -o OUT`` follows the same rules with its own marker: ``--force``
  replaces only an export bundle (:func:`is_export_bundle`), never its input model folder.
- While a run writes OUT it holds an exclusive ``flock`` on ``OUT/.knowpress.lock`` (released
  by the kernel when the process ends, however it ends); a second run on the same OUT gets
  one line naming the holder's PID.
- Temporaries an interrupted run could not remove (``.tmp-*``, ``.old-*``, left only by
  SIGKILL or power loss) are swept when the folder is taken.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
from pathlib import Path
from types import TracebackType

from knowpress.core.errors import KnowpressError

RUN_MARKER = "knowpress_run.json"
LOCK_FILE = ".knowpress.lock"


def is_run(folder: Path) -> bool:
    return (folder / RUN_MARKER).is_file()


def is_export_bundle(folder: Path) -> bool:
    """A folder ``compress export`` (or an export stage) wrote: an exported format (one no
    torch runtime loads) that its own manifest names."""
    from knowpress.formats import detect

    try:
        fmt, manifest = detect(folder)
    except KnowpressError:
        return False
    return manifest is not None and fmt.runtime != "torch" and fmt.detect(folder)


def check_not_input(out: Path, inputs: dict[str, Path], flag: str = "-o") -> None:
    """``out`` is none of ``inputs`` (field -> path), no folder holding one and no folder
    inside one: writing (or with ``--force`` clearing) it would change what the command
    reads."""
    target = Path(out).expanduser().resolve()
    for field, path in inputs.items():
        source = Path(path).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "holds"
        elif source in target.parents:
            relation = "is inside"
        else:
            continue
        raise KnowpressError(
            f"{flag} {out}: {relation} {field} {path}, an input of this command; write the "
            f"output somewhere else (choose another {flag})"
        )


class OutputFolder:
    """Context manager taking ``out_dir`` for one run (see the module docstring)."""

    def __init__(
        self, out_dir: Path, *, resume: bool, force: bool, inputs: dict[str, Path] | None = None
    ) -> None:
        self.path, self.resume, self.force = Path(out_dir), resume, force
        self.inputs = inputs or {}
        self._fd: int | None = None
        self._created = False
        self._cleared = False

    def __enter__(self) -> OutputFolder:
        path = self.path
        if path.exists() and not path.is_dir():
            raise KnowpressError(f"output {path} is a file; choose a folder with -o")
        check_not_input(path, self.inputs)
        if path.is_dir():
            self._check_rules()  # a folder that is refused gets no lock file either
        else:
            path.mkdir(parents=True)
            self._created = True
        self._lock()
        try:
            self._check_rules()  # again under the lock: another run may have written it
        except KnowpressError:
            self._release()
            raise
        sweep_temporaries(path)
        return self

    def _check_rules(self) -> None:
        """A non-empty OUT needs --resume or --force, both only on a knowpress run."""
        path = self.path
        if not any(p.name != LOCK_FILE for p in path.iterdir()):
            return
        if self.resume and not is_run(path):
            raise KnowpressError(f"--resume: {path} is not a knowpress run (no {RUN_MARKER})")
        if self.force and not is_run(path):
            raise KnowpressError(
                f"--force: {path} is not a knowpress run (no {RUN_MARKER}); knowpress only "
                f"replaces its own runs, so empty it yourself or choose another -o"
            )
        if not (self.resume or self.force):
            raise KnowpressError(
                f"output folder {path} already exists; pass --resume to continue it or --force "
                f"to replace it (or choose another with -o)"
            )

    def first_write(self, version: str) -> None:
        """Called just before the run writes anything: a forced run clears the old one."""
        if self.force and not self._cleared:
            for item in self.path.iterdir():
                if item.name == LOCK_FILE:
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
            self._cleared = True
        from knowpress.core.io import atomic_write_text

        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        marker = {"knowpress_version": version, "created_utc": created}
        atomic_write_text(self.path / RUN_MARKER, json.dumps(marker) + "\n")

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KnowpressError(
                f"output folder {self.path} is being written by another run (PID {holder}); "
                f"wait for it to finish or choose another -o"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _release(self) -> None:
        if self._fd is None:
            return
        only_lock = [p.name for p in self.path.iterdir()] == [LOCK_FILE]
        if self._created and only_lock:  # nothing was written: leave no empty folder behind
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.path.rmdir()
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()


def sweep_temporaries(folder: Path) -> None:
    """Remove ``.tmp-*`` / ``.old-*`` files and folders an interrupted write left under it."""
    for item in sorted(folder.rglob(".tmp-*")) + sorted(folder.rglob(".old-*")):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        elif item.exists() or item.is_symlink():
            item.unlink(missing_ok=True)


def stage_dir(out_dir: Path, index: int, kind: str) -> Path:
    return out_dir / "stages" / f"{index + 1:02d}-{kind}"


def resume_dir(target: Path, digest: str) -> Path:
    """``stages/.resume-NN-kind-HASH``: where the stage's mid-run checkpoints survive a kill.
    Those of an earlier config of the same stage (another hash) are removed."""
    for stale in target.parent.glob(f".resume-{target.name}-*"):
        if not stale.name.endswith(digest[:12]):
            shutil.rmtree(stale, ignore_errors=True)
    return target.parent / f".resume-{target.name}-{digest[:12]}"
