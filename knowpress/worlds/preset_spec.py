"""What a teacher preset is: a world, a model architecture and a training schedule, by name.

``architecture`` picks the transformers model family (``ARCHITECTURES``: dense Llama, or the
sparse mixture-of-experts Mixtral / Qwen2-MoE / Qwen3-MoE); ``model`` holds that config's
kwargs. ``Preset.key()`` = ``canonical_hash({"teacher_version", "world", "architecture",
"model", "train"})`` (see
``config.canonical_hash``): everything that determines the trained teacher and nothing that
does not (name, description). It names the cache directory ``{name}-{key}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from knowpress.core.registry import Registry
from knowpress.worlds.config import WORLD_VERSION, WorldConfig, canonical_hash
from knowpress.worlds.facts import FactsWorldConfig

# Bump when the training code changes what a preset produces (cached teachers go stale).
TEACHER_VERSION = 4

# architecture -> (transformers config class, causal-LM class), resolved by training.make_model.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
Architecture = Literal["llama", "mixtral", "qwen2_moe", "qwen3_moe"]

# Filled from the tokenizer by build_teacher; a preset must not set them.
_DERIVED_MODEL_KEYS = frozenset({"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"})


class TrainConfig(BaseModel):
    """Teacher training schedule.

    Each epoch shows every training bio and that epoch's in-context passages once and every
    trained QA string ``qa_repeat`` times (QA is what recall is measured on). Learning rate:
    linear warmup over ``warmup`` steps to ``lr``, then cosine decay to
    ``lr * min_lr_ratio`` at ``steps``. AdamW, gradient norm clipped to ``grad_clip``.
    Sequences longer than ``seq_len`` tokens are truncated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    qa_repeat: int = Field(4, ge=0)  # 0: no QA strings (a "base" teacher, before its QA data)
    seq_len: int = Field(128, ge=8)
    seed: int = 0
    # Loss on in-context passages: "all" tokens (the bios too) or only the "questions" and
    # answers after the bios.
    in_context_loss: Literal["all", "questions"] = "all"
    # Copy sequences per epoch: ``<s> span . span </s>``, span = ``copy_span`` (min, max)
    # random world words, loss on the second copy only. They teach the induction-style
    # copying that reading a many-valued answer out of the context needs (long_context).
    copy_examples: int = Field(0, ge=0)
    copy_span: tuple[int, int] = (4, 24)
    # Continue from another preset's teacher (same world, architecture and model) instead of a
    # fresh init: ``bios-dense-tiny-sft`` is ``bios-dense-tiny-base`` after its QA data.
    init_from: str | None = None

    @field_validator("copy_span")
    @classmethod
    def _span_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("copy_span must be (min, max) with 1 <= min <= max")
        return value


class Preset(BaseModel):
    """A named recipe for a teacher: ``build_teacher(name)`` trains (or loads) it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    world: WorldConfig | FactsWorldConfig
    architecture: Architecture = "llama"
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
                "world": (
                    {"facts_key": self.world.key()}  # content hash: an edited file retrains
                    if isinstance(self.world, FactsWorldConfig)
                    else self.world.key_fields()
                ),
                "architecture": self.architecture,
                "model": self.model,
                "train": self.train.model_dump(mode="json", exclude=_unused_copy(self.train)),
                **({"init_from": PRESETS.get(self.train.init_from).key()}
                   if self.train.init_from else {}),
            }
        )  # fmt: skip


def _unused_copy(train: TrainConfig) -> set[str]:
    """The copy-sequence fields when no copies are made, and ``init_from`` (the base's own key
    stands for it): left out of the key, so teachers built before the options existed keep
    their keys (and their caches)."""
    unused = {"copy_examples", "copy_span"} if train.copy_examples == 0 else set()
    return unused | {"init_from"}


PRESETS: Registry[Preset] = Registry("world preset")


def _register(preset: Preset) -> Preset:
    return PRESETS.register(preset.name)(preset)
