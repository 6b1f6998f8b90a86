"""``recall``: does the model still produce each fact in the question format it was
trained on? Greedy answer vs gold, exact match after normalisation (token F1 as extra).

Knowledge *storage*, in the sense of Allen-Zhu & Li, "Physics of Language Models 3.1"
(arXiv:2309.14316); LLM-KICK (Jaiswal et al. 2023, arXiv:2310.01382) shows perplexity alone
misses exactly this loss under compression.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.metrics import exact_match, token_f1
from knowpress.evaluate.tasks.base import TASKS, Task, TaskResult, pick

if TYPE_CHECKING:
    from knowpress.evaluate.runtime import Runtime
    from knowpress.world import World


@TASKS.register("recall")
class Recall(Task):
    name = "recall"
    metric = "exact_match"
    summary = "trained question format, greedy answer, exact match"
    paper = "Allen-Zhu & Li 2023, arXiv:2309.14316"
    split = "trained"

    def run(self, runtime: Runtime, world: World, max_items: int | None) -> TaskResult:
        items = pick(world.questions(self.split), max_items)
        if not items:
            raise ValueError(f"world has no {self.split} questions")
        longest = max(len(runtime.tokenizer.tokenize(" " + it.answer)) for it in items)  # type: ignore[attr-defined]
        answers = runtime.greedy([it.prompt for it in items], max_new_tokens=longest + 1)
        em = [exact_match(a, it.answer) for a, it in zip(answers, items, strict=True)]
        f1 = [token_f1(a, it.answer) for a, it in zip(answers, items, strict=True)]
        wrong = [
            {"prompt": it.prompt, "gold": it.answer, "prediction": a}
            for a, it, ok in zip(answers, items, em, strict=True)
            if not ok
        ]
        per_attr: dict[str, list[float]] = {}
        for it, ok in zip(items, em, strict=True):
            per_attr.setdefault(it.attribute, []).append(ok)
        extra = {"token_f1": sum(f1) / len(f1)}
        extra.update({f"em/{a}": sum(v) / len(v) for a, v in sorted(per_attr.items())})
        return TaskResult(sum(em) / len(em), len(items), extra, wrong[:5])
