"""Shared question-answering scoring: greedy answers, exact match, token F1, per attribute.

Used by every QA-style task (``recall``, ``paraphrase``, ``two_hop``, ``long_context``) so
they differ only in which items they ask, never in how answers are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from knowpress.errors import KnowpressError
from knowpress.evaluate.metrics import exact_match, token_f1
from knowpress.evaluate.tasks.base import TaskResult

if TYPE_CHECKING:
    from knowpress.evaluate.runtime import Runtime
    from knowpress.world.generator import QAItem
    from knowpress.world.protocol import FactWorld


def answer_budget(runtime: Runtime, items: Sequence[QAItem]) -> int:
    """New tokens to generate: the longest gold answer's token count + 1 (room for ``</s>``)."""
    tokenize = runtime.tokenizer.tokenize  # type: ignore[attr-defined]
    return max(len(tokenize(" " + it.answer)) for it in items) + 1


def score_qa(runtime: Runtime, items: Sequence[QAItem], n_examples: int = 5) -> TaskResult:
    """EM (score) and token F1 / per-attribute EM (extra) of greedy answers to ``items``.

    ``examples`` holds the first ``n_examples`` wrong answers (prompt, gold, prediction).
    """
    if not items:
        raise ValueError("no items to score")
    answers = runtime.greedy(
        [it.prompt for it in items], max_new_tokens=answer_budget(runtime, items)
    )
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
    return TaskResult(sum(em) / len(em), len(items), extra, wrong[:n_examples])


def uniform_guess_chance(world: FactWorld, items: Sequence[QAItem]) -> float | None:
    """Mean over attributes of 1/|S_a|: EM of a guess drawn uniformly from the value pool.

    ``None`` when no item's attribute has a pool (nothing to compare with).
    """
    rates = []
    for attribute in sorted({it.attribute for it in items}):
        try:
            pool = world.value_pool(attribute)
        except (ValueError, KeyError):
            continue
        if pool:
            rates.append(1.0 / len(pool))
    return sum(rates) / len(rates) if rates else None


def world_method(world: object, method: str, task: str) -> object:
    """``world.<method>`` or a one-line KnowpressError saying which worlds support ``task``."""
    found = getattr(world, method, None)
    if not callable(found):
        raise KnowpressError(
            f"evaluate.tasks: task {task!r} needs a synthetic bioS world (world.{method}); "
            f"this world ({type(world).__name__}) has none -- remove {task} from evaluate.tasks"
        )
    return found
