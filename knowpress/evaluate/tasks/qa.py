"""Shared question-answering scoring: greedy answers, exact match, token F1, per attribute,
and flips against the reference.

Used by every QA-style task (``recall``, ``paraphrase``, ``two_hop``, ``long_context``) so
they differ only in which items they ask, never in how answers are scored. A run leaves the
per-item correctness in its state (``correct``, uint8) and in its ``items`` (statistic
``accuracy``: what the report's intervals and McNemar tests resample); given the reference's,
the extras ``flips/lost`` (share of items the reference answers right and this model wrong)
and ``flips/gained`` (the reverse) show what equal accuracy hides (Dutta et al. 2024,
"Accuracy is not all you need", arXiv:2407.09141).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.metrics import exact_match, token_f1
from knowpress.evaluate.tasks.base import State, TaskResult

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds.generator import QAItem
    from knowpress.worlds.protocol import FactWorld


def answer_budget(runtime: Runtime, items: Sequence[QAItem]) -> int:
    """New tokens to generate: the longest gold answer's token count + 1 (room for ``</s>``)."""
    tokenize = runtime.tokenizer.tokenize  # type: ignore[attr-defined]
    return max(len(tokenize(" " + it.answer)) for it in items) + 1


def flips(correct: Sequence[bool], reference: State | None) -> dict[str, float]:
    """``flips/lost`` and ``flips/gained`` against the reference's ``correct`` (same items)."""
    if reference is None or "correct" not in reference:
        return {}
    theirs = [bool(x) for x in reference["correct"].tolist()]
    if len(theirs) != len(correct):
        counts = f"the reference scored {len(theirs)} items, this run {len(correct)}"
        raise ValueError(f"flips: {counts}")
    lost = sum(r and not m for r, m in zip(theirs, correct, strict=True))
    gained = sum(m and not r for r, m in zip(theirs, correct, strict=True))
    return {"flips/lost": lost / len(correct), "flips/gained": gained / len(correct)}


def correct_state(correct: Sequence[bool]) -> State:
    import torch

    return {"correct": torch.tensor([int(c) for c in correct], dtype=torch.uint8)}


def score_qa(
    runtime: Runtime,
    items: Sequence[QAItem],
    n_examples: int = 5,
    reference: State | None = None,
) -> TaskResult:
    """EM (score) and token F1 / per-attribute EM / flips (extra) of greedy answers to
    ``items``; ``examples`` holds the first ``n_examples`` wrong answers (prompt, gold,
    prediction), ``state`` the per-item correctness.
    """
    if not items:
        raise ValueError("no items to score")
    contexts = [it.context for it in items]
    answers = runtime.greedy(
        [it.prompt for it in items], max_new_tokens=answer_budget(runtime, items),
        **({"contexts": contexts} if any(contexts) else {}),
    )  # fmt: skip
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
    extra.update(flips([bool(x) for x in em], reference))
    score = sum(em) / len(em)
    return TaskResult(
        score, len(items), extra, wrong[:n_examples], correct_state(em),
        items={"correct": [float(x) for x in em]}, statistic="accuracy",
    )  # fmt: skip


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
