"""Every registry has a matrix row for each registered entry, and no row without an entry."""

from __future__ import annotations

from typing import Any

import default_entries as rows
import pytest

from knowpress.compress.kv import KV_POLICIES
from knowpress.compress.moe import EXPERT_PRUNERS
from knowpress.compress.quant import QUANT_METHODS
from knowpress.distill import DISTILL_LOSSES
from knowpress.evaluate.loader import RUNTIME_FORMATS
from knowpress.evaluate.tasks import TASKS
from knowpress.registry import Registry
from knowpress.stage import STAGES

FAMILIES: list[tuple[Registry[Any], dict[str, Any]]] = [
    (STAGES, rows.STAGES),
    (QUANT_METHODS, rows.QUANT_METHODS),
    (TASKS, rows.TASKS),
    (KV_POLICIES, rows.KV_POLICIES),
    (RUNTIME_FORMATS, rows.RUNTIME_FORMATS),
    (DISTILL_LOSSES, rows.DISTILL_LOSSES),
    (EXPERT_PRUNERS, rows.EXPERT_PRUNERS),
]


@pytest.mark.parametrize(("registry", "matrix"), FAMILIES, ids=[r.family for r, _ in FAMILIES])
def test_every_registered_entry_has_a_matrix_row(
    registry: Registry[Any], matrix: dict[str, Any]
) -> None:
    assert set(registry.names()) == set(matrix), f"{registry.family}: add or remove rows"
