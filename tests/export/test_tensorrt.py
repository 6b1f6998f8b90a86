"""TensorRT: one clear line where tensorrt or a CUDA GPU is missing (this CI), before any
work; float32 graphs only."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.onnx import tensorrt

HERE = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HERE, reason="tensorrt and a GPU are present: the error path cannot run")
def test_missing_tensorrt_is_one_clear_line() -> None:
    assert tensorrt.available() is not None
    with pytest.raises(KnowpressError, match=r"^tensorrt: (tensorrt is not installed|.*GPU)"):
        tensorrt.check("float32")


@pytest.mark.skipif(HERE, reason="tensorrt and a GPU are present")
def test_recipe_asking_for_an_engine_fails_before_the_first_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from knowpress.pipeline.preflight import check_stages
    from knowpress.pipeline.recipe import validate_recipe
    from knowpress.testing.models import tiny_llama

    recipe = validate_recipe({
        "version": 1, "model": {"path": str(tmp_path)},
        "stages": [{"kind": "export", "weights": "float32", "tensorrt": {"precision": "fp16"}}],
    })  # fmt: skip
    with pytest.raises(KnowpressError, match=r"stages.0 \(export\): tensorrt: "):
        check_stages(recipe, tiny_llama())
