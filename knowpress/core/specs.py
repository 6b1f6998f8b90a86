"""The recipe's plain value types, below every layer that uses them: where a model comes
from (``ModelSpec``, its deploy and compute ``Dtype``), the calibration text data-aware
stages run on (``CalibrationSpec``, ``DataSpec``). Validated data, no behaviour; the recipe
(``pipeline/recipe.py``) adds what needs the registries (a world name must be a preset)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import yaml_value


class Strict(FrozenConfig):
    """Recipe sections: frozen, unknown fields rejected."""


Dtype = Literal["float32", "bfloat16", "float16"]
#: ``auto``: bfloat16 on cuda, float32 on the CPU (``core/device.resolve_compute_dtype``)
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]

#: transformers' shard size: stage outputs larger than this are written as shards + an index
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def size_bytes(value: Any) -> int:
    """Bytes of a size given as a whole number of bytes or a string like ``"5GB"``,
    ``"500MB"``, ``"2GiB"`` (decimal units as transformers reads them, binary with ``i``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value.lower()) if isinstance(
        value, str) else None  # fmt: skip
    if match and match.group(2) in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise ValueError(
            f"{yaml_value(value)} is not a size; give bytes (a whole number) or a string like "
            f"'5GB' or '500MB'"
        )
    if size < 1:
        raise ValueError(f"{yaml_value(value)} is under one byte; give a size like '5GB'")
    return size


class ModelSpec(Strict):
    """Where a model comes from: a built-in fact-world teacher, or a path / hub id.

    ``dtype`` is the deploy dtype: every tensor a stage does not compress is stored in it.
    ``compute_dtype`` is what stages and evaluation compute in (weights are cast on load):
    ``auto`` resolves once against the run's device (bfloat16 on cuda, float32 on the CPU);
    a reference's or teacher's ``auto`` follows the model's resolved dtype.
    ``max_shard_size`` is the largest safetensors file a stage writes (bytes, or ``"5GB"``):
    a larger model is stored as shards with a ``model.safetensors.index.json``.
    """

    world: str | None = Field(None, description="built-in preset, e.g. bios-dense-tiny")
    path: str | None = Field(None, description="local HF directory or hub id")
    trust_remote_code: bool = False
    dtype: Dtype = Field("bfloat16", description="stored dtype of tensors no stage compresses")
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype stages and evaluation run in (auto: bf16 on cuda, else fp32)"
    )
    max_shard_size: int = Field(
        DEFAULT_MAX_SHARD_SIZE, description="largest weight file a stage writes, e.g. '5GB'"
    )

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return size_bytes(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.world is None) == (self.path is None):
            raise ValueError("give exactly one of 'world' (a built-in preset) or 'path'")
        return self


class CalibrationSpec(Strict):
    """The text data-aware stages (GPTQ, expert statistics) run the model on: the world's
    training text (``train``: bios and questions), its held-out text (``heldout``: bios in
    templates the teacher never saw), half of each (``mix``), a local file (``path``:
    .txt paragraphs, .jsonl / .json records), or a dataset in the local Hugging Face cache
    (``dataset: name`` or ``name:config``). Packed into ``samples`` sequences of ``seq_len``
    tokens (see ``pipeline/calibration.py``)."""

    world: Literal["train", "heldout", "mix"] = "train"
    path: str | None = Field(None, description="a local .txt / .jsonl / .json file")
    field: str = Field("text", description="string field of JSON records (path, dataset)")
    dataset: str | None = Field(None, description="HF dataset in the local cache")
    split: str = "train"
    samples: int = Field(128, gt=0)
    seq_len: int = Field(256, ge=8)
    seed: int = 0
    offload: bool = Field(
        False, description="block-wise passes keep activations on the CPU between blocks"
    )

    @model_validator(mode="after")
    def _one_file_source(self) -> CalibrationSpec:
        if self.path is not None and self.dataset is not None:
            raise ValueError("give at most one of 'path' and 'dataset' (else the world's text)")
        return self


class DataSpec(Strict):
    calibration: CalibrationSpec = CalibrationSpec()
