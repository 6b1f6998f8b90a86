"""``long_context``: read the answer from the prompt. A haystack of biographies of
*fictional* people (never in the world, so the model cannot answer from memory) is followed
by a trained-format question about one of them. Scored at doubling haystack sizes (1, 2, 4,
... bios) while the prompt plus the answer fits the model's ``max_position_embeddings``, then
at the largest size that still fits, so the longest prompt reaches the model's maximum;
score = mean exact match over those lengths, per-length EM and token counts in ``extra``.
``max_items`` caps the items of the whole task (spread evenly over the sizes, at least one
each; default 32 per size). Chance is per haystack size: 1/k for k bios (``chance/bios=k`` in
``extra``), the documented failure, the asked attribute read from a random person of the
haystack. A one-bio haystack has no such failure (its one person is always the asked one), so
the task's chance is the mean of 1/k over the sizes of two or more bios, compared with the
mean EM over those same sizes (``em/multi_bio``, the score the near-chance flag reads); when
only one bio fits, chance falls back to a uniform guess from the value pool.
When the world trains in-context passages (``in_context_examples``), ``extra`` also holds
``trained_bios`` (its ``in_context_bios``, the most bios a training passage holds) and
``em/trained_lengths``, the mean EM over the haystacks no longer than that: reading at the
lengths the teacher was trained on, apart from generalising past them.

Compression (KV-cache and attention quantization in particular) tends to hurt in-context
retrieval before it hurts memorised facts: "needle in a haystack" (Kamradt 2023) and
RULER (Hsieh et al. 2024, arXiv:2404.06654).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult
from knowpress.evaluate.tasks.qa import (
    answer_budget,
    correct_state,
    flips,
    score_qa,
    uniform_guess_chance,
    world_method,
)

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World
    from knowpress.worlds.items import QAItem

DEFAULT_ITEMS = 32  # per context length without ``max_items``
_EXAMPLE_CHARS = 160  # long prompts are cut to their tail in the report's examples


def _chance(
    sizes: list[tuple[int, list[QAItem], int]], ems: list[float], extra: dict[str, float]
) -> tuple[float | None, float | None]:
    """Chance 1/k per size (into ``extra``); the task's chance and the EM compared with it,
    both over the sizes of two or more bios (None, None when only one bio fits)."""
    multi = [(n, em) for (n, _, _), em in zip(sizes, ems, strict=True) if n >= 2]
    for n, _, _ in sizes:
        extra[f"chance/bios={n}"] = 1 / n
    if not multi:
        return None, None
    basis = sum(em for _, em in multi) / len(multi)
    extra["em/multi_bio"] = basis
    return sum(1 / n for n, _ in multi) / len(multi), basis


def trained_bios(world: World) -> int | None:
    """Most bios in one of the world's training passages, or None when it trains none."""
    config = getattr(world, "config", None)
    if not getattr(config, "in_context_examples", 0):
        return None
    return int(config.in_context_bios)  # type: ignore[union-attr]


@TASKS.register("long_context")
class LongContext(Task):
    name = "long_context"
    metric = "exact_match"
    summary = "question about one of several in-context biographies, EM averaged over lengths"
    paper = "Hsieh et al. 2024 (RULER), arXiv:2404.06654"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        sizes = self._sizes(runtime, world, max_items or DEFAULT_ITEMS)
        per_size = DEFAULT_ITEMS if max_items is None else max(1, max_items // len(sizes))
        extra: dict[str, float] = {"max_positions": float(runtime.max_positions)}
        ems, examples, correct, group = [], [], [], []
        for index, (n, items, longest) in enumerate(sizes):
            result = score_qa(runtime, items[:per_size], n_examples=2)
            ems.append(result.score)
            correct += [bool(x) for x in result.state["correct"].tolist()]
            group += [float(index)] * result.n
            extra[f"em/bios={n}"] = result.score
            extra[f"tokens/bios={n}"] = float(longest)
            examples = [
                {**ex, "prompt": "..." + ex["prompt"][-_EXAMPLE_CHARS:]} for ex in result.examples
            ] or examples
        trained = trained_bios(world)
        within = [em for (n, _, _), em in zip(sizes, ems, strict=True) if trained and n <= trained]
        if within:
            extra["trained_bios"] = float(trained or 0)
            extra["em/trained_lengths"] = sum(within) / len(within)
        extra.update(flips(correct, reference))
        chance, basis = _chance(sizes, ems, extra)
        return TaskResult(
            sum(ems) / len(ems), len(correct), extra, examples, correct_state(correct), chance,
            basis, {"correct": [float(c) for c in correct], "group": group},
            "stratified_accuracy",
        )  # fmt: skip

    def _sizes(
        self, runtime: Runtime, world: World, n_items: int
    ) -> list[tuple[int, list[QAItem], int]]:
        """(bios, items, longest prompt) for each haystack size scored (see the module doc)."""
        haystack = world_method(world, "haystack_items", self.name)
        limit = runtime.max_positions

        def fitting(n_bios: int) -> tuple[list[QAItem], int] | None:
            items = haystack(n_bios=n_bios, n_items=n_items)  # type: ignore[operator]
            ids = runtime.tokenizer([it.prompt for it in items], verbose=False)["input_ids"]
            longest = max(len(x) for x in ids)
            return (items, longest) if longest + answer_budget(runtime, items) <= limit else None

        sizes: list[tuple[int, list[QAItem], int]] = []
        n_bios = 1
        while (fit := fitting(n_bios)) is not None:
            sizes.append((n_bios, *fit))
            n_bios *= 2
        if not sizes:
            raise ValueError(f"long_context: one biography does not fit in {limit} positions")
        # Between the last doubling that fit and the first that did not, the largest that fits.
        for n in range(n_bios - 1, sizes[-1][0], -1):
            if (fit := fitting(n)) is not None:
                sizes.append((n, *fit))
                break
        return sizes

    def unsupported(self, world: World) -> str | None:
        if not callable(getattr(world, "haystack_items", None)):
            return f"it needs a synthetic bioS world; this one is {type(world).__name__}"
        return None

    def chance(self, world: World) -> float | None:
        """1/|S_a| averaged over the asked attributes (a guess that ignores the context)."""
        haystack = world_method(world, "haystack_items", self.name)
        return uniform_guess_chance(world, haystack(n_bios=1, n_items=DEFAULT_ITEMS))  # type: ignore[operator]
