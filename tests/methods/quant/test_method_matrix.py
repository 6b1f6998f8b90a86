"""Every registered quant method, each row of its matrix, on a tiny Llama: SQNR floor per
layer, exact reload of what was stored, stored bytes within 1% of the plan's prediction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import default_entries as rows
import pytest
import torch

from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.methods.quant import QUANT_METHODS, QuantLinear
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.targets import select
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.tensors.packing import sqnr_db
from knowpress.testing.models import tiny_llama, tiny_tokenizer

CASES = [(name, block, floor) for name, entries in rows.QUANT_METHODS.items()
         for block, floor in entries]  # fmt: skip


IDS = [f"{n}-{b.get('dtype', 'int')}{b.get('bits', '')}-g{b.get('group_size')}-{i}"
       for i, (n, b, _) in enumerate(CASES)]  # fmt: skip


@pytest.mark.parametrize(("name", "block", "floor"), CASES, ids=IDS)
def test_method_row(
    name: str, block: dict[str, Any], floor: float, tmp_path: Path,
    calibrated: Callable[[torch.nn.Module], Any],
) -> None:  # fmt: skip
    method = QUANT_METHODS.get(name).model_validate(block)
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    targets = select(model, None, ["lm_head"])
    assert not [p for p in map(method.check_target, targets) if p]
    originals = {t.module: model.get_submodule(t.module).weight.detach().clone() for t in targets}
    predicted = predicted_bytes(model, resolve(method, None, targets), "float32")
    method.apply(model, targets, calibrated(model), Progress(False))
    for module, weight in originals.items():
        packed = model.get_submodule(module)
        assert isinstance(packed, QuantLinear) and packed.bits == method.bits
        assert packed.grid == block.get("dtype", "int")
        assert sqnr_db(weight, packed.dequantized_weight()) > floor, module
    save_model(model, tiny_tokenizer(), tmp_path)
    stored = (tmp_path / "model.safetensors").stat().st_size
    assert abs(stored - predicted) <= 0.01 * stored
    reloaded, _ = load_model(tmp_path)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
