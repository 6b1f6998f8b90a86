"""``bits``: knowledge bits stored in the model, from the loss on each fact's value.

Physics of LMs 3.3 (Allen-Zhu & Li 2024, arXiv:2404.05405): for attribute ``a`` with
``|S_a|`` possible values, ``N_a`` facts and mean value loss ``L_a`` (nats, summed over the
value's tokens given the trained question prompt),

    bits_a = N_a * max(0, log2|S_a| - L_a / ln 2)

and the score is ``sum_a bits_a``. A model that guesses uniformly has ``L_a = ln|S_a|`` and
stores 0 bits; one that is certain of every value stores ``N_a log2|S_a|``. Retention =
compressed / teacher bits. Derived attributes (``company_city``) are skipped because their
information is already counted by ``employer`` plus the company facts; the company
headquarters facts themselves count as attribute ``company_hq``.

``L_a`` is the NLL of ``prompt + " " + value`` minus that of ``prompt``: the value's tokens
given the prompt (exact when the prompt's tokens are a prefix of the joined text's, as with
the world tokenizer). With ``max_items`` the losses are estimated on an evenly spaced subset
of each attribute's facts and ``N_a`` stays the world's count. ``bits_per_parameter`` uses
the runtime's logical parameter count; bits per stored byte is added by the report, which
knows the stored size. Each scored item keeps its loss, attribute (``group``), ``N_a`` and
``log2|S_a|`` (``items``, statistic ``bits``): intervals resample items within attributes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult, pick_by_attribute
from knowpress.worlds.config import DERIVED_ATTRIBUTES
from knowpress.worlds.generator import QAItem
from knowpress.worlds.templates import COMPANY_TEMPLATES

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World

COMPANY_HQ = "company_hq"


def value_losses(runtime: Runtime, items: Sequence[QAItem]) -> list[float]:
    """NLL (nats) of each item's answer tokens given its prompt."""
    joined = runtime.nll([f"{it.prompt} {it.answer}" for it in items])
    prompts = runtime.nll([it.prompt for it in items])
    return [max(0.0, j.nats - p.nats) for j, p in zip(joined, prompts, strict=True)]


def bits_of(n_facts: int, pool_size: int, mean_loss_nats: float) -> float:
    """``N * max(0, log2|S| - L/ln 2)`` (see the module doc)."""
    return n_facts * max(0.0, math.log2(pool_size) - mean_loss_nats / math.log(2))


def knowledge_items(world: World) -> tuple[list[QAItem], dict[str, int]]:
    """Trained-format items per stored fact, and ``|S_a|`` per attribute."""
    items = [q for q in world.questions("trained") if q.attribute not in DERIVED_ATTRIBUTES]
    pools = {a: len(world.value_pool(a)) for a in sorted({q.attribute for q in items})}
    company_facts = getattr(world, "company_facts", None)
    if callable(company_facts) and company_facts():
        template = COMPANY_TEMPLATES.trained[0]
        items += [
            QAItem(template.format(company=c), city, c, COMPANY_HQ) for c, city in company_facts()
        ]
        pools[COMPANY_HQ] = world.config.pools.company_city  # type: ignore[attr-defined]
    return items, pools


@TASKS.register("bits")
class Bits(Task):
    name = "bits"
    metric = "bits"
    summary = "knowledge bits sum_a N_a*max(0, log2|S_a| - L_a/ln2) from value losses"
    paper = "Allen-Zhu & Li 2024, arXiv:2404.05405"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        items, pools = knowledge_items(world)
        if not items:
            raise ValueError("world has no facts to measure bits on")
        counts = Counter(it.attribute for it in items)
        sample = pick_by_attribute(items, max_items)
        losses: dict[str, list[float]] = {}
        columns: dict[str, list[float]] = {"loss": [], "group": [], "count": [], "log2_pool": []}
        order = {a: float(i) for i, a in enumerate(sorted(counts))}
        for it, loss in zip(sample, value_losses(runtime, sample), strict=True):
            losses.setdefault(it.attribute, []).append(loss)
            columns["loss"].append(loss)
            columns["group"].append(order[it.attribute])
            columns["count"].append(float(counts[it.attribute]))
            columns["log2_pool"].append(math.log2(pools[it.attribute]))
        extra: dict[str, float] = {}
        total = 0.0
        for attribute, values in sorted(losses.items()):
            mean = sum(values) / len(values)
            bits = bits_of(counts[attribute], pools[attribute], mean)
            total += bits
            extra[f"bits/{attribute}"] = bits
            extra[f"loss_nats/{attribute}"] = mean
            extra[f"capacity_bits/{attribute}"] = counts[attribute] * math.log2(pools[attribute])
        params = runtime.parameter_count()
        extra["parameters"] = float(params)
        extra["bits_per_parameter"] = total / params
        return TaskResult(total, len(sample), extra, items=columns, statistic="bits")
