"""Teacher presets: a world, a Llama-style architecture and a training schedule, by name.

``Preset.key()`` = ``canonical_hash({"teacher_version", "world", "model", "train"})`` (see
``config.canonical_hash``): everything that determines the trained teacher and nothing that
does not (name, description). It names the cache directory ``{name}-{key}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from knowpress.registry import Registry
from knowpress.world.config import WORLD_VERSION, PoolSizes, WorldConfig, canonical_hash

# Bump when the training code changes what a preset produces (cached teachers go stale).
TEACHER_VERSION = 1

# Filled from the tokenizer by build_teacher; a preset must not set them.
_DERIVED_MODEL_KEYS = frozenset({"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"})


class TrainConfig(BaseModel):
    """Teacher training schedule.

    Each epoch shows every training bio once and every trained QA string ``qa_repeat`` times
    (QA is what recall is measured on). Learning rate: linear warmup over ``warmup`` steps
    to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``. AdamW, gradient
    norm clipped to ``grad_clip``. Sequences longer than ``seq_len`` tokens are truncated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    qa_repeat: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0


class Preset(BaseModel):
    """A named recipe for a teacher: ``build_teacher(name)`` trains (or loads) it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    world: WorldConfig
    model: dict[str, Any]
    train: TrainConfig

    @field_validator("model")
    @classmethod
    def _no_derived_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_DERIVED_MODEL_KEYS & set(value))
        if clash:
            raise ValueError(f"model must not set {', '.join(clash)} (taken from the tokenizer)")
        return value

    def key(self) -> str:
        """Short stable hash of everything that determines the teacher (see module doc)."""
        return canonical_hash(
            {
                "teacher_version": TEACHER_VERSION,
                "world_version": WORLD_VERSION,
                "world": self.world.model_dump(mode="json"),
                "model": self.model,
                "train": self.train.model_dump(mode="json"),
            }
        )


PRESETS: Registry[Preset] = Registry("world preset")


def _register(preset: Preset) -> Preset:
    return PRESETS.register(preset.name)(preset)


_TINY_MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

_register(
    Preset(
        name="bios-dense-tiny",
        description=(
            "Quickstart: 200 people x 5 attributes, 2-layer Llama (0.6M params), "
            "~1.5 min on one CPU thread."
        ),
        world=WorldConfig(
            seed=0,
            n_people=200,
            attributes=("birth_date", "birth_city", "university", "major", "employer"),
            bios_per_person=2,
            permute_sentences=True,
        ),
        model=_TINY_MODEL,
        train=TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup=50, qa_repeat=4),
    )
)

_register(
    Preset(
        name="test-tiny",
        description="Unit tests: 32 people x 3 attributes, small pools, trains in ~10 s on CPU.",
        world=WorldConfig(
            seed=1,
            n_people=32,
            attributes=("birth_city", "university", "major"),
            pools=PoolSizes(birth_city=20, university=20, major=20),
            bios_per_person=1,
            permute_sentences=True,
        ),
        model=_TINY_MODEL,
        train=TrainConfig(steps=400, batch_size=16, lr=3e-3, warmup=20, qa_repeat=4),
    )
)
