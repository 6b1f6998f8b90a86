"""``compress list``: every registered name, one per line, never cut.

A table would shrink its columns to a narrow terminal and end names with "…"; here each
entry is ``family  name  what (paper)`` on its own line, printed without rich's wrapping, so
the terminal wraps long lines and every name stays whole (and greppable).
"""

from __future__ import annotations

import argparse
from typing import Any


def families() -> list[tuple[str, dict[str, Any]]]:
    """(family, {name: config class or preset}) for every registry a recipe names from, and
    the quantize stage's bit plans."""
    import knowpress.pipeline.stages  # noqa: F401  (registers the stage kinds)
    from knowpress.evaluate.tasks import TASKS
    from knowpress.methods.distill import DISTILL_LOSSES
    from knowpress.methods.experts import EXPERT_PRUNERS
    from knowpress.methods.kv import KV_POLICIES
    from knowpress.methods.quant import QUANT_METHODS
    from knowpress.methods.quant.bit_plans import BIT_PLANS
    from knowpress.pipeline.stage import STAGES
    from knowpress.worlds import PRESETS

    return [
        ("stage", dict(STAGES.items())), ("quant method", dict(QUANT_METHODS.items())),
        ("bit plan", dict(BIT_PLANS.items())),
        ("expert pruning", dict(EXPERT_PRUNERS.items())), ("KV policy", dict(KV_POLICIES.items())),
        ("distill loss", dict(DISTILL_LOSSES.items())), ("eval task", dict(TASKS.items())),
        ("world preset", dict(PRESETS.items())),
    ]  # fmt: skip


def lines() -> list[str]:
    rows = []
    for family, entries in families():
        for name, entry in entries.items():
            what = getattr(entry, "summary", None) or getattr(entry, "description", "")
            paper = getattr(entry, "paper", "")
            rows.append((family, name, f"{what} ({paper})" if paper else what))
    family_width = max(len(r[0]) for r in rows)
    name_width = max(len(r[1]) for r in rows)
    return [f"{f:<{family_width}}  {n:<{name_width}}  {w}".rstrip() for f, n, w in rows]


def cmd_list(args: argparse.Namespace) -> int:
    from knowpress.cli.app import out

    for line in lines():
        out.print(line, soft_wrap=True, highlight=False, markup=False)
    return 0
