"""A stage context with calibration data, for quant methods that need it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from knowpress.context import Context
from knowpress.recipe import validate_recipe
from knowpress.testing.models import tiny_tokenizer


@pytest.fixture
def calibrated(tmp_path: Path) -> Callable[[torch.nn.Module], Context]:
    """``calibrated(model)``: a Context whose ``data.calibration`` is a word-level text file
    of ``tiny_tokenizer``'s words (16 sequences of 64 tokens)."""
    words = [f"w{i}" for i in range(124)]
    text = "\n\n".join(" ".join(words[(7 * i + j) % 124] for j in range(50)) for i in range(40))
    (tmp_path / "calib.txt").write_text(text)
    recipe = validate_recipe({
        "version": 1, "model": {"path": "./unused"},
        "data": {"calibration": {"path": str(tmp_path / "calib.txt"), "samples": 16,
                                 "seq_len": 64}},
    })  # fmt: skip

    def make(model: torch.nn.Module) -> Context:
        return Context(recipe=recipe, model=model, tokenizer=tiny_tokenizer(), out_dir=tmp_path)

    return make
