"""The quantize stage's integrity check fails on each way a saved folder can lie: a float copy
beside the codes, codes at other bits, bytes off the plan, a reload that answers otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.io import save_model
from knowpress.methods.quant.plan import Assignment, resolve
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.pipeline.context import Context
from knowpress.pipeline.integrity import check_bits, check_folder, check_round_trip
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import predicted_bytes
from knowpress.testing.models import tiny_llama, tiny_tokenizer

RTN4 = RTN(name="rtn", bits=4, group_size=32, symmetric=True)


def _saved(tmp_path: Path, method: RTN = RTN4) -> tuple[Context, list[Assignment], int]:
    """A tiny model quantized with ``method`` and saved (knowpress format), its plan, the
    predicted bytes."""
    model = tiny_llama()
    assignments = resolve(method, None, select(model, None, ["lm_head"]))
    predicted = predicted_bytes(model, assignments, "float32")
    method.apply(model, [a.target for a in assignments], None, Progress(False))  # type: ignore[arg-type]
    stage = {"kind": "quantize", "method": {"name": "rtn"}}
    recipe = validate_recipe(
        {"version": 1, "model": {"path": "./x", "dtype": "float32"}, "stages": [stage]}
    )
    ctx = Context.for_recipe(recipe, model, tiny_tokenizer(), None)  # type: ignore[arg-type]
    save_model(model, ctx.tokenizer, tmp_path)
    return ctx, assignments, predicted


def test_a_faithful_folder_passes(tmp_path: Path) -> None:
    ctx, assignments, predicted = _saved(tmp_path)
    check_bits(ctx, assignments)
    check_folder(assignments, tmp_path, predicted)
    check_round_trip(ctx, tmp_path)


def test_a_float_copy_beside_the_codes_fails(tmp_path: Path) -> None:
    _, assignments, predicted = _saved(tmp_path)
    name = assignments[0].target.name
    save_file({name: torch.zeros(assignments[0].target.shape)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KnowpressError, match=rf"{name} was stored as a float tensor"):
        check_folder(assignments, tmp_path, predicted)


def test_codes_at_other_bits_than_planned_fail(tmp_path: Path) -> None:
    ctx, assignments, predicted = _saved(tmp_path, RTN(name="rtn", bits=8, group_size=32))
    planned = [Assignment(a.target, RTN4, a.rule, a.fallback) for a in assignments]
    with pytest.raises(KnowpressError, match=r"is at 8 bits, the plan says 4"):
        check_bits(ctx, planned)
    with pytest.raises(KnowpressError, match=r"stored 64 bytes per row, 4-bit codes take 32"):
        check_folder(planned, tmp_path, predicted)


def test_bytes_off_the_prediction_fail(tmp_path: Path) -> None:
    _, assignments, predicted = _saved(tmp_path)
    check_folder(assignments, tmp_path, int(predicted * 1.009))  # within the 1% tolerance
    with pytest.raises(KnowpressError, match=r"bytes stored, the plan predicted"):
        check_folder(assignments, tmp_path, int(predicted * 1.05))


def test_a_reload_that_answers_otherwise_fails(tmp_path: Path) -> None:
    ctx, _, _ = _saved(tmp_path)
    with torch.no_grad():  # the in-memory model is no longer what the folder holds
        ctx.model.get_input_embeddings().weight.normal_(generator=torch.Generator().manual_seed(1))
    with pytest.raises(KnowpressError, match=r"the saved folder is not what ran"):
        check_round_trip(ctx, tmp_path)
