"""Score a runtime on every requested task and compare with the teacher's scores."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from knowpress.evaluate.tasks import TASKS
from knowpress.evaluate.tasks.base import retention

if TYPE_CHECKING:
    from knowpress.evaluate.runtime import Runtime
    from knowpress.progress import Progress
    from knowpress.world import World


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    higher_is_better: bool
    score: float
    n: int
    extra: dict[str, float]
    examples: list[dict[str, Any]]
    # Uninformed-guess score on this world (None: no baseline); defaulted so old eval.json loads.
    chance: float | None = None

    @property
    def near_chance(self) -> bool:
        """True when the score is below 2x chance (only meaningful for the teacher's score)."""
        return self.chance is not None and self.higher_is_better and self.score < 2 * self.chance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskScore:
        return cls(**data)


def evaluate_runtime(
    runtime: Runtime,
    world: World,
    tasks: list[str],
    max_items: int | None,
    progress: Progress | None = None,
) -> dict[str, TaskScore]:
    """Run each task once, in the order given."""
    out: dict[str, TaskScore] = {}
    names = progress.track(tasks, "evaluating") if progress else tasks
    for name in names:
        task = TASKS.get(name)()
        result = task.run(runtime, world, max_items)
        out[name] = TaskScore(
            name,
            task.metric,
            task.higher_is_better,
            result.score,
            result.n,
            result.extra,
            result.examples,
            task.chance(world),
        )
    return out


def retention_table(
    scores: dict[str, TaskScore], teacher: dict[str, TaskScore]
) -> dict[str, float]:
    """Per-task retention = compressed / teacher (inverted for lower-is-better metrics);
    the direction is the score's own, so harness tasks (``lm_eval/...``) work too."""
    return {
        name: retention(score.score, teacher[name].score, score.higher_is_better)
        for name, score in scores.items()
    }


def worst(retention: dict[str, float]) -> tuple[str, float]:
    """The task with the lowest retention; NaN (undefined) counts as worst."""

    def key(item: tuple[str, float]) -> float:
        return -math.inf if math.isnan(item[1]) else item[1]

    return min(retention.items(), key=key)
