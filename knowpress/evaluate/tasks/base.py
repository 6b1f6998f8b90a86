"""The task interface: score one runtime on one world, deterministically.

A run on the reference (``reference=None``) returns, beside its score, a ``state``: tensors
later rows are compared against (the reference's per-item correctness for flips, its
next-token distributions for ``kl``). The runner stores it with the reference's scores
(safetensors) and hands it to ``run(..., reference=state)`` for every stage, so all rows are
compared with the same reference outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from knowpress.core.registry import Registry

if TYPE_CHECKING:
    import torch

    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World

#: tensors a reference run leaves for later rows (name -> tensor), saved as safetensors
State = dict[str, "torch.Tensor"]

T = TypeVar("T")


@dataclass(frozen=True)
class TaskResult:
    """``score`` is the task's headline metric; ``extra`` other metrics; ``examples`` a few
    scored items (prompt, gold, prediction) for the report."""

    score: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    #: what later rows compare against (kept from the reference's run only)
    state: State = field(default_factory=dict)
    #: this run's own chance score when it depends on what was scored (else ``Task.chance``)
    chance: float | None = None
    #: the score compared with ``chance`` when it is not ``score`` (``long_context``: the
    #: haystacks of two or more bios, the ones chance is defined on)
    chance_basis: float | None = None
    #: per-item numbers (column -> one value per item) that ``statistic`` turns into the
    #: score (``evaluate/uncertainty.py``): what intervals and paired tests resample
    items: dict[str, list[float]] = field(default_factory=dict)
    statistic: str | None = None


class Task:
    """Subclasses set the class attributes and implement ``run``.

    ``relative``: the score is compared as retention (score / reference score); False for
    a score that already compares with the reference (``kl``: 0 is "same as the reference"),
    which the gate bounds directly instead. ``needs_facts``: the task asks a fact world's
    questions (False: it only reads held-out text, so a user's text file serves).
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    relative: ClassVar[bool] = True
    needs_facts: ClassVar[bool] = True
    #: the longest sequence the task runs, in tokens (None: up to the runtime's
    #: ``max_positions``); ``evaluate.batch_size: auto`` sizes batches for the longest task
    max_tokens: ClassVar[int | None] = None
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
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
