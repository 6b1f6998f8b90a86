"""Every registry has a matrix row for each registered entry, and no row without an entry."""

from __future__ import annotations

from typing import Any

import default_entries as rows
import pytest

from knowpress.core.registry import Registry
from knowpress.evaluate.tasks import TASKS
from knowpress.formats import FORMATS
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.experts import EXPERT_PRUNERS
from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.bit_plans import BIT_PLANS
from knowpress.pipeline.stage import STAGES

FAMILIES: list[tuple[Registry[Any], dict[str, Any]]] = [
    (STAGES, rows.STAGES),
    (QUANT_METHODS, rows.QUANT_METHODS),
    (BIT_PLANS, rows.BIT_PLANS),
    (TASKS, rows.TASKS),
    (KV_POLICIES, rows.KV_POLICIES),
    (FORMATS, rows.FORMATS),
    (DISTILL_LOSSES, rows.DISTILL_LOSSES),
    (EXPERT_PRUNERS, rows.EXPERT_PRUNERS),
]


@pytest.mark.parametrize(("registry", "matrix"), FAMILIES, ids=[r.family for r, _ in FAMILIES])
def test_every_registered_entry_has_a_matrix_row(
    registry: Registry[Any], matrix: dict[str, Any]
) -> None:
    assert set(registry.names()) == set(matrix), f"{registry.family}: add or remove rows"
