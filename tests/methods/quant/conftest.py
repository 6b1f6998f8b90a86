"""Calibration batches for quant methods that need them (what the quantize stage hands a
method), and a stage context over the same text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.pipeline.context import Context
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import calibration
from knowpress.testing.models import tiny_tokenizer


@pytest.fixture
def calibrated(tmp_path: Path) -> Callable[[torch.nn.Module], Any]:
    """``calibrated(model)``: the calibration callable the quantize stage would hand a method
    for ``model``, over a word-level text file of ``tiny_tokenizer``'s words (16 sequences
    of 64 tokens)."""
    words = [f"w{i}" for i in range(124)]
    text = "\n\n".join(" ".join(words[(7 * i + j) % 124] for j in range(50)) for i in range(40))
    (tmp_path / "calib.txt").write_text(text)
    recipe = validate_recipe({
        "version": 1, "model": {"path": "./unused"},
        "data": {"calibration": {"path": str(tmp_path / "calib.txt"), "samples": 16,
                                 "seq_len": 64}},
    })  # fmt: skip

    def make(model: torch.nn.Module) -> Any:
        ctx = Context.for_recipe(recipe, model, tiny_tokenizer(), tmp_path)
        return calibration(ctx)

    return make
