"""Bit plans: per-tensor bits, group size and symmetry for a quantize stage.

```yaml
- kind: quantize
  method: {name: gptq, bits: 4, group_size: 128}     # the default for every target
  plan:
    rules:                                          # the first rule matching a tensor wins
      - {match: "re:.*experts.*", bits: 3}
      - {match: "*.down_proj", bits: 8, group_size: 64}
```

A rule's ``match`` uses the target patterns (tensor or module name, glob or ``re:``); its
fields override the method's for the tensors it matches. A rule that matches no targeted
tensor is an error (a typo would otherwise quantize everything at the default). A group size
that does not divide a tensor's input width falls back to the largest divisor of that width
between 16 and the requested size, else one group per row, and the plan says so: real
checkpoints have widths like 172 that no power of two divides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError
from knowpress.methods.quant.targets import Target, check_patterns, matches

if TYPE_CHECKING:
    from knowpress.methods.quant.base import QuantMethod

MIN_GROUP = 16


class Rule(FrozenConfig):
    match: str = Field(description="tensor or module name: glob, or re: regex")
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = Field(None, gt=0)
    per_row: bool = Field(False, description="one group per output row (group_size ignored)")
    symmetric: bool | None = None


class PlanSpec(FrozenConfig):
    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class Assignment:
    """The settings one target is quantized with, and why."""

    target: Target
    method: QuantMethod
    rule: int | None  # index of the rule that set them (None: the method's defaults)
    fallback: str | None  # the group-size fallback applied, if any
    rule_bits: bool = False  # a rule set its bits (a bits_plan leaves them)


def fallback_group(in_features: int, wanted: int) -> int:
    """``wanted`` if it divides ``in_features``; else its largest divisor in
    [MIN_GROUP, wanted]; else ``in_features`` (one group per row)."""
    if in_features % wanted == 0:
        return wanted
    for size in range(min(wanted, in_features), MIN_GROUP - 1, -1):
        if in_features % size == 0:
            return size
    return in_features


def resolve(
    method: QuantMethod, plan: PlanSpec | None, targets: Sequence[Target]
) -> list[Assignment]:
    """Each target's settings: the first matching rule over the method's (see module doc)."""
    rules = plan.rules if plan else []
    check_patterns([r.match for r in rules], "quantize.plan.rules")
    used: set[int] = set()
    out = []
    for target in targets:
        index = next((i for i, rule in enumerate(rules) if matches(rule.match, target)), None)
        update: dict[str, object] = {}
        if index is not None:
            used.add(index)
            rule = rules[index]
            fields = {"bits": rule.bits, "group_size": rule.group_size, "symmetric": rule.symmetric}
            update = {k: v for k, v in fields.items() if v is not None}
            if rule.per_row:
                update["group_size"] = None
        chosen = method.model_copy(update=update) if update else method
        chosen, fallback = _fit_group(chosen, target)
        out.append(Assignment(target, chosen, index, fallback, "bits" in update))
    unused = [i for i in range(len(rules)) if i not in used]
    if unused:
        raise KnowpressError(
            f"quantize.plan.rules.{unused[0]}: {rules[unused[0]].match!r} matches no targeted "
            f"tensor (rules apply to what targets minus ignore select)"
        )
    return out


def _fit_group(method: QuantMethod, target: Target) -> tuple[QuantMethod, str | None]:
    wanted = getattr(method, "group_size", None)
    if wanted is None or target.kind not in ("linear", "fused_experts"):
        return method, None
    width = target.shape[-1]
    size = fallback_group(width, wanted)
    if size == wanted:
        return method, None
    label = "per row" if size == width else f"group {size}"
    fitted = method.model_copy(update={"group_size": None if size == width else size})
    return fitted, f"group_size {wanted} does not divide {width}: {label}"
