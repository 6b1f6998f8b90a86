"""Progress reporting handed to stages: rich bars on a terminal, nothing when quiet."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

T = TypeVar("T")


class Progress:
    """``track`` wraps an iterable with a bar; ``enabled=False`` makes it a pass-through."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._bars: RichProgress | None = None
        self._tracked: tuple[object, str] | None = None

    @contextmanager
    def session(self) -> Iterator[Progress]:
        if not self.enabled:
            yield self
            return
        self._bars = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        with self._bars:
            try:
                yield self
            finally:
                self._bars = None

    def track(
        self, items: Iterable[T], description: str, total: int | None = None, completed: int = 0
    ) -> Iterator[T]:
        """``completed``: steps already done (a resumed loop starts its bar there)."""
        bars = self._bars  # the session may end (Ctrl-C) while this generator is suspended
        if bars is None:
            yield from items
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = bars.add_task(description, total=total, completed=completed)
        self._tracked = (task, description)
        try:
            for item in items:
                yield item
                bars.advance(task)
        finally:
            if self._bars is bars:
                bars.remove_task(task)

    def note(self, text: str) -> None:
        """Show ``text`` after the innermost bar's description (loss, schedule values)."""
        if self._bars is not None and self._tracked is not None:
            task, description = self._tracked
            if task in self._bars.task_ids:
                self._bars.update(task, description=f"{description} {text}")

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)
