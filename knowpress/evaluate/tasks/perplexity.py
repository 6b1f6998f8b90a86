"""``perplexity``: exp(mean next-token NLL) on held-out biographies (same people and
facts, renderings not seen verbatim in training). Lower is better, so retention is
teacher / compressed. Reported beside recall because it hides knowledge loss on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.runtime import perplexity
from knowpress.evaluate.tasks.base import TASKS, Task, TaskResult, pick

if TYPE_CHECKING:
    from knowpress.evaluate.runtime import Runtime
    from knowpress.world import World


@TASKS.register("perplexity")
class Perplexity(Task):
    name = "perplexity"
    metric = "perplexity"
    higher_is_better = False
    summary = "perplexity on held-out biographies (lower is better)"
    paper = "Jaiswal et al. 2023 (LLM-KICK), arXiv:2310.01382"

    def unsupported(self, world: World) -> str | None:
        return None if world.heldout_texts() else "this world has no held-out text"

    def run(self, runtime: Runtime, world: World, max_items: int | None) -> TaskResult:
        texts = pick(world.heldout_texts(), max_items)
        if not texts:
            raise ValueError("world has no held-out text")
        nlls = runtime.nll(texts)
        tokens = sum(n.tokens for n in nlls)
        return TaskResult(perplexity(nlls), len(texts), {"tokens": float(tokens)})
