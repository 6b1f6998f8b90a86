"""The task interface: score one runtime on one fact world, deterministically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from knowpress.registry import Registry

if TYPE_CHECKING:
    from knowpress.evaluate.runtime import Runtime
    from knowpress.world import World

T = TypeVar("T")


@dataclass(frozen=True)
class TaskResult:
    """``score`` is the task's headline metric; ``extra`` other metrics; ``examples`` a few
    scored items (prompt, gold, prediction) for the report."""

    score: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)


class Task:
    """Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def run(self, runtime: Runtime, world: World, max_items: int | None) -> TaskResult:
        raise NotImplementedError

    def unsupported(self, world: World) -> str | None:
        """Why this task cannot score ``world`` (checked before a run writes anything), or
        None. The default asks nothing of the world."""
        return None

    def chance(self, world: World) -> float | None:
        """Score of an uninformed guesser on ``world`` (``None``: no meaningful baseline).

        A teacher scoring below 2x chance is flagged "near chance" in the report: retention
        of a skill the teacher barely has says little about compression.
        """
        return None

    def retention(self, score: float, teacher_score: float) -> float:
        return retention(score, teacher_score, self.higher_is_better)


def retention(score: float, teacher_score: float, higher_is_better: bool) -> float:
    """Compressed / teacher for higher-is-better metrics, teacher / compressed otherwise.

    A teacher score of 0 leaves retention undefined (reported as NaN and flagged).
    """
    if higher_is_better:
        return score / teacher_score if teacher_score > 0 else float("nan")
    return teacher_score / score if score > 0 else float("nan")


def pick(items: Sequence[T], max_items: int | None) -> list[T]:
    """Evenly spaced, deterministic subset (every attribute stays represented)."""
    if max_items is None or max_items >= len(items):
        return list(items)
    step = len(items) / max_items
    return [items[int(i * step)] for i in range(max_items)]


def pick_by_attribute(items: Sequence[T], max_items: int | None) -> list[T]:
    """``max_items`` items spread over every ``item.attribute`` (``pick`` within each).

    QA items are person-major, so a plain evenly spaced subset can land on a single
    attribute when the step is a multiple of the attribute count. Quotas differ by at most
    one between attributes; the result keeps the attributes' first-seen order.
    """
    if max_items is None or max_items >= len(items):
        return list(items)
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(item.attribute, []).append(item)  # type: ignore[attr-defined]
    base, extra = divmod(max_items, len(groups))
    return [
        it
        for i, group in enumerate(groups.values())
        for it in pick(group, base + (1 if i < extra else 0))
    ]


TASKS: Registry[type[Task]] = Registry("eval task")
