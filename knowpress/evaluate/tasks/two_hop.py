"""``two_hop``: composed questions, person -> employer -> headquarters city, in one question
that never occurs in training ("In which city is the company that X works for
headquartered? A:"). Both facts are in the training text separately; answering needs the
model to chain them without writing the intermediate answer down.

Allen-Zhu & Li, "Physics of Language Models 3.2" (arXiv:2309.14402) and Yang et al. 2024
("Do LLMs latently perform multi-hop reasoning?", arXiv:2402.16837): small models often
cannot, so this task is frequently flagged near chance; retention is then not meaningful.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult, pick
from knowpress.evaluate.tasks.qa import score_qa, world_method

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World


@TASKS.register("two_hop")
class TwoHop(Task):
    name = "two_hop"
    metric = "exact_match"
    summary = "composed person->employer->city questions, greedy answer, exact match"
    paper = "Allen-Zhu & Li 2023, arXiv:2309.14402"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        items = pick(world_method(world, "two_hop_questions", self.name)(), max_items)  # type: ignore[operator]
        if not items:
            raise ValueError("world has no 2-hop questions (needs employer and company_facts)")
        return score_qa(runtime, items, reference=reference)

    def unsupported(self, world: World) -> str | None:
        questions = getattr(world, "two_hop_questions", None)
        if not callable(questions):
            return f"this world ({type(world).__name__}) has no 2-hop questions"
        if not questions():
            return "this world has no 2-hop questions (it needs employer and company_facts)"
        return None

    def chance(self, world: World) -> float | None:
        """1/|cities companies can be in|: a uniform guess of the headquarters city."""
        pools = getattr(world.config, "pools", None)
        return 1.0 / pools.company_city if pools is not None else None
