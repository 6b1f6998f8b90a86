"""The recipe's plain value types, below every layer that uses them: where a model comes
from (``ModelSpec``, its deploy and compute ``Dtype``), the calibration text data-aware
stages run on (``CalibrationSpec``, ``DataSpec``). Validated data, no behaviour; the recipe
(``pipeline/recipe.py``) adds what needs the registries (a world name must be a preset)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from knowpress.core.config import FrozenConfig


class Strict(FrozenConfig):
    """Recipe sections: frozen, unknown fields rejected."""


Dtype = Literal["float32", "bfloat16", "float16"]
#: ``auto``: bfloat16 on cuda, float32 on the CPU (``core/device.resolve_compute_dtype``)
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(Strict):
    """Where a model comes from: a built-in fact-world teacher, or a path / hub id.

    ``dtype`` is the deploy dtype: every tensor a stage does not compress is stored in it.
    ``compute_dtype`` is what stages and evaluation compute in (weights are cast on load):
    ``auto`` resolves once against the run's device (bfloat16 on cuda, float32 on the CPU);
    a reference's or teacher's ``auto`` follows the model's resolved dtype.
    """

    world: str | None = Field(None, description="built-in preset, e.g. bios-dense-tiny")
    path: str | None = Field(None, description="local HF directory or hub id")
    trust_remote_code: bool = False
    dtype: Dtype = Field("bfloat16", description="stored dtype of tensors no stage compresses")
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype stages and evaluation run in (auto: bf16 on cuda, else fp32)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.world is None) == (self.path is None):
            raise ValueError("give exactly one of 'world' (a built-in preset) or 'path'")
        return self


class CalibrationSpec(Strict):
    """The text data-aware stages (GPTQ, expert statistics) run the model on: the world's
    training text (``train``: bios and questions) or held-out text, a local file (``path``:
    .txt paragraphs, .jsonl / .json records), or a dataset in the local Hugging Face cache
    (``dataset: name`` or ``name:config``). Packed into ``samples`` sequences of ``seq_len``
    tokens (see ``pipeline/calibration.py``)."""

    world: Literal["train", "heldout"] = "train"
    path: str | None = Field(None, description="a local .txt / .jsonl / .json file")
    field: str = Field("text", description="string field of JSON records (path, dataset)")
    dataset: str | None = Field(None, description="HF dataset in the local cache")
    split: str = "train"
    samples: int = Field(128, gt=0)
    seq_len: int = Field(256, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _one_file_source(self) -> CalibrationSpec:
        if self.path is not None and self.dataset is not None:
            raise ValueError("give at most one of 'path' and 'dataset' (else the world's text)")
        return self


class DataSpec(Strict):
    calibration: CalibrationSpec = CalibrationSpec()
