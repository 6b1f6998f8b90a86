"""``perplexity``: exp(mean next-token NLL) on held-out text — the world's held-out
biographies (same people and facts, renderings not seen verbatim in training), or the
user's ``evaluate.text``. Lower is better, so retention is reference / compressed. Reported
beside recall because it hides knowledge loss on its own.

Tokens the tokenizer does not know (``unk``) are not scored: a text the tokenizer cannot
represent would otherwise be scored on how well the model predicts ``<unk>``.
``extra.unknown_share`` says how much of the text that was; the report warns above 10%.
Per text, its summed NLL and scored tokens are kept (``items``: ``nats``, ``tokens``; statistic
``perplexity``) so the report's intervals resample texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult, pick
from knowpress.runtimes.torch import perplexity

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World


@TASKS.register("perplexity")
class Perplexity(Task):
    name = "perplexity"
    metric = "perplexity"
    higher_is_better = False
    needs_facts = False
    summary = "perplexity on held-out biographies (lower is better)"
    paper = "Jaiswal et al. 2023 (LLM-KICK), arXiv:2310.01382"

    def unsupported(self, world: World) -> str | None:
        return None if world.heldout_texts() else "this world has no held-out text"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        texts = pick(world.heldout_texts(), max_items)
        if not texts:
            raise ValueError("world has no held-out text")
        unk = runtime.tokenizer.unk_token_id
        excluded = () if unk is None else (unk,)
        nlls = runtime.nll(texts, exclude_token_ids=excluded)
        scored = sum(n.tokens for n in nlls)
        encoded = runtime.tokenizer(list(texts), truncation=True, max_length=runtime.max_positions)
        total = sum(len(ids) - 1 for ids in encoded["input_ids"])
        extra = {"tokens": float(scored), "unknown_share": 1 - scored / total if total else 0.0}
        if scored == 0:
            raise ValueError("perplexity: every token of the held-out text is unknown")
        items = {"nats": [n.nats for n in nlls], "tokens": [float(n.tokens) for n in nlls]}
        return TaskResult(perplexity(nlls), len(texts), extra, items=items, statistic="perplexity")
