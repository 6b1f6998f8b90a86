"""``recall``: does the model still produce each fact in the question format it was
trained on? Greedy answer vs gold, exact match after normalisation (token F1 as extra).

Knowledge *storage*, in the sense of Allen-Zhu & Li, "Physics of Language Models 3.1"
(arXiv:2309.14316); LLM-KICK (Jaiswal et al. 2023, arXiv:2310.01382) shows perplexity alone
misses exactly this loss under compression.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult, pick_by_attribute
from knowpress.evaluate.tasks.qa import score_qa, uniform_guess_chance

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World


@TASKS.register("recall")
class Recall(Task):
    name = "recall"
    metric = "exact_match"
    summary = "trained question format, greedy answer, exact match"
    paper = "Allen-Zhu & Li 2023, arXiv:2309.14316"
    split = "trained"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        items = pick_by_attribute(world.questions(self.split), max_items)
        if not items:
            raise ValueError(f"world has no {self.split} questions")
        return score_qa(runtime, items, reference=reference)

    def unsupported(self, world: World) -> str | None:
        return None if world.questions(self.split) else f"this world has no {self.split} questions"

    def chance(self, world: World) -> float | None:
        """1/|S_a| averaged over the attributes asked (a uniform guess from the pool)."""
        return uniform_guess_chance(world, world.questions(self.split))
