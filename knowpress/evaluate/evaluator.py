"""Score a runtime on every requested task and compare with the teacher's scores."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from knowpress.evaluate.tasks import TASKS
from knowpress.evaluate.tasks.base import retention

if TYPE_CHECKING:
    from knowpress.core.progress import Progress
    from knowpress.evaluate.tasks.base import State
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World


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
    #: compared as retention (False: the score already compares with the reference, kl)
    relative: bool = True
    #: the score compared with chance when it is not ``score`` (``TaskResult.chance_basis``)
    chance_basis: float | None = None
    #: per-item columns and the statistic that makes the score of them
    #: (``evaluate/uncertainty.py``); empty for old eval.json and harness tasks
    items: dict[str, list[float]] = field(default_factory=dict)
    statistic: str | None = None

    @property
    def near_chance(self) -> bool:
        """True when the score (or its ``chance_basis``) is below 2x chance (only meaningful
        for the reference's score)."""
        basis = self.score if self.chance_basis is None else self.chance_basis
        return self.chance is not None and self.higher_is_better and basis < 2 * self.chance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskScore:
        return cls(**data)


@dataclass(frozen=True)
class Measurement:
    """One scored artifact: task scores and what it costs, as the report shows them.

    ``stored_bytes`` is the artifact's payload on disk; ``parameters`` the logical count
    (packed weights count unpacked); ``kv_bytes_per_token`` measured on the cache of the
    attached policy (the full cache without one); ``runtime`` the runtime's ``describe()``
    (runtime, device, dtype, kv_policy) at the time of the measurement.
    """

    scores: dict[str, TaskScore]
    stored_bytes: int
    parameters: int
    kv_bytes_per_token: float
    runtime: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = {name: s.to_json() for name, s in self.scores.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        scores = {name: TaskScore.from_json(v) for name, v in data["scores"].items()}
        return cls(**{**data, "scores": scores})


def measure(runtime: Runtime, scores: dict[str, TaskScore], stored_bytes: int) -> Measurement:
    """A :class:`Measurement` of ``runtime`` with its task ``scores``."""
    return Measurement(
        scores=scores,
        stored_bytes=stored_bytes,
        parameters=runtime.parameter_count(),
        kv_bytes_per_token=runtime.kv_bytes_per_token(),
        runtime=runtime.describe(),
    )


def evaluate_runtime(
    runtime: Runtime,
    world: World,
    tasks: list[str],
    max_items: int | None,
    progress: Progress | None = None,
    reference: dict[str, State] | None = None,
) -> dict[str, TaskScore]:
    """Run each task once, in the order given; with ``reference`` (task -> the reference's
    state, from :func:`evaluate_reference`) tasks compare with the reference's outputs."""
    return _evaluate(runtime, world, tasks, max_items, progress, reference)[0]


def evaluate_reference(
    runtime: Runtime,
    world: World,
    tasks: list[str],
    max_items: int | None,
    progress: Progress | None = None,
) -> tuple[dict[str, TaskScore], dict[str, State]]:
    """Score the reference and keep what later rows compare against (task -> state)."""
    return _evaluate(runtime, world, tasks, max_items, progress, None)


def _evaluate(
    runtime: Runtime,
    world: World,
    tasks: list[str],
    max_items: int | None,
    progress: Progress | None,
    reference: dict[str, State] | None,
) -> tuple[dict[str, TaskScore], dict[str, State]]:
    out: dict[str, TaskScore] = {}
    states: dict[str, State] = {}
    names = progress.track(tasks, "evaluating") if progress else tasks
    for name in names:
        task = TASKS.get(name)()
        given = None if reference is None else reference.get(name)
        if reference is not None and given is None and not task.relative:
            raise ValueError(f"{name}: no reference state to compare with")
        result = task.run(runtime, world, max_items, given)
        if result.state:
            states[name] = result.state
        chance = result.chance if result.chance is not None else task.chance(world)
        out[name] = TaskScore(
            name, task.metric, task.higher_is_better, result.score, result.n, result.extra,
            result.examples, chance, task.relative, result.chance_basis, result.items,
            result.statistic,
        )  # fmt: skip
    return out, states


def longest_sequence(tasks: list[str], max_positions: int) -> int:
    """The longest sequence ``tasks`` run on a model of ``max_positions`` (``Task.max_tokens``;
    a task without a bound runs up to ``max_positions``): what batches are sized for."""
    return min(max_positions, max(TASKS.get(t).max_tokens or max_positions for t in tasks))


def retention_table(
    scores: dict[str, TaskScore], teacher: dict[str, TaskScore]
) -> dict[str, float]:
    """Per-task retention = compressed / reference (inverted for lower-is-better metrics);
    the direction is the score's own, so harness tasks (``lm_eval/...``) work too. Tasks
    that are not relative (``kl``) have none: the gate bounds them directly."""
    return {
        name: retention(score.score, teacher[name].score, score.higher_is_better)
        for name, score in scores.items()
        if score.relative
    }


def worst(
    retention: dict[str, float], skip: frozenset[str] | set[str] = frozenset()
) -> tuple[str | None, float | None]:
    """The task with the lowest retention, leaving out ``skip`` (tasks whose reference is
    near chance: their retention means nothing); NaN (undefined) counts as worst."""
    retention = {t: v for t, v in retention.items() if t not in skip}
    if not retention:
        return None, None

    def key(item: tuple[str, float]) -> float:
        return -math.inf if math.isnan(item[1]) else item[1]

    return min(retention.items(), key=key)
