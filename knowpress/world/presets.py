"""Teacher presets: a world, a model architecture and a training schedule, by name.

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

from knowpress.registry import Registry
from knowpress.world.config import WORLD_VERSION, PoolSizes, WorldConfig, canonical_hash
from knowpress.world.facts import FactsWorldConfig

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


_TINY_MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
# Sparse MoE tiny models: 8 experts, top-2 routing, the attention of _TINY_MODEL.
_TINY_MIXTRAL: dict[str, Any] = {
    **_TINY_MODEL,
    "intermediate_size": 256,  # per expert
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
_TINY_QWEN2_MOE: dict[str, Any] = {
    **_TINY_MODEL,
    "intermediate_size": 256,  # dense MLP size (unused: every layer is sparse)
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 256,  # Qwen-MoE: one always-on shared expert
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
}

# bioS world of the bios-* tiny presets: 5 drawn attributes + the pronoun used in bios, company
# headquarters facts (for two_hop) and in-context passages of fictional people (long_context).
# company_city is not a per-person attribute here, so two_hop needs both hops.
_TINY_WORLD = WorldConfig(
    seed=0,
    n_people=200,
    attributes=("birth_date", "birth_city", "university", "major", "employer", "pronoun"),
    bios_per_person=2,
    permute_sentences=True,
    question_templates=4,
    in_context_examples=6000,
    in_context_bios=4,
    in_context_questions=4,
)
_TINY_TRAIN = TrainConfig(steps=3000, batch_size=32, lr=3e-3, warmup=50, qa_repeat=2, seq_len=256)

# The quickstart teacher: recall + perplexity only, so no in-context passages and one trained
# phrasing per attribute; trains in ~1.5 min on one thread (the first-run budget is 10 min).
_register(
    Preset(
        name="bios-dense-tiny",
        description=(
            "Quickstart: 200 people x 5 attributes, 2-layer Llama (0.6M params), "
            "~1.5 min on one CPU thread; scored on recall and perplexity."
        ),
        world=WorldConfig(
            seed=0,
            n_people=200,
            attributes=("birth_date", "birth_city", "university", "major", "employer"),
            bios_per_person=2,
            permute_sentences=True,
            full_name_instead_of_pronoun=True,
            company_facts=False,
        ),
        model=_TINY_MODEL,
        train=TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup=50, qa_repeat=4),
    )
)

# Delta-KD's pair: the quickstart teacher's world and model trained on the bios alone
# ("teacher base"), then the same weights trained on the bios and their QA strings ("SFT").
_TINY_QUICK_WORLD = PRESETS.get("bios-dense-tiny").world
_register(
    Preset(
        name="bios-dense-tiny-base",
        description="bios-dense-tiny trained on its bios only (no QA strings): Delta-KD's base.",
        world=_TINY_QUICK_WORLD,
        model=_TINY_MODEL,
        train=TrainConfig(steps=1500, batch_size=32, lr=3e-3, warmup=50, qa_repeat=0),
    )
)
_register(
    Preset(
        name="bios-dense-tiny-sft",
        description="bios-dense-tiny-base after its QA data (bios + QA strings, 1000 steps).",
        world=_TINY_QUICK_WORLD,
        model=_TINY_MODEL,
        train=TrainConfig(steps=1000, batch_size=32, lr=1e-3, warmup=20, qa_repeat=4,
                          init_from="bios-dense-tiny-base"),
    )
)  # fmt: skip

_register(
    Preset(
        name="bios-dense-tiny-full",
        description=(
            "200 people x 6 attributes (4 trained phrasings each) + company facts + 6000 "
            "in-context passages, 2-layer Llama (0.6M params), ~8 min on one CPU thread."
        ),
        world=_TINY_WORLD,
        model=_TINY_MODEL,
        train=_TINY_TRAIN,
    )
)

_register(
    Preset(
        name="bios-moe-tiny",
        description="bios-dense-tiny's world, 2-layer Mixtral (8 experts, top-2).",
        world=_TINY_WORLD,
        architecture="mixtral",
        model=_TINY_MIXTRAL,
        train=_TINY_TRAIN,
    )
)

_register(
    Preset(
        name="bios-qwenmoe-tiny",
        description="bios-dense-tiny's world, 2-layer Qwen2-MoE (8 experts top-2 + shared expert).",
        world=_TINY_WORLD,
        architecture="qwen2_moe",
        model=_TINY_QWEN2_MOE,
        train=_TINY_TRAIN,
    )
)

# Small presets read answers out of 7-person contexts; lookups (nine tenths of the passages)
# are what teach binding. Trail: benchmarks/results/presets_notes.md.
_SMALL_MODEL: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
_SMALL_WORLD = WorldConfig(
    seed=0,
    n_people=400,
    attributes=("birth_date", "birth_city", "university", "major", "employer", "pronoun"),
    bios_per_person=2,
    permute_sentences=True,
    question_templates=4,
    in_context_examples=24000,
    in_context_bios=7,
    in_context_questions=8,
    in_context_style="facts",
    in_context_lookup=0.9,
)
_SMALL_TRAIN = TrainConfig(
    steps=6000,
    batch_size=32,
    lr=1e-3,
    warmup=100,
    qa_repeat=2,
    seq_len=512,
    in_context_loss="questions",
    copy_examples=4000,
)
# Top-2 of 8 experts: each expert sees a quarter of the tokens, so MoE presets bind later and
# train a third longer (benchmarks/results/presets_notes.md).
_SMALL_MOE_TRAIN = _SMALL_TRAIN.model_copy(update={"steps": 10000})

_register(
    Preset(
        name="bios-dense-small",
        description="400 people x 6 attributes, 4 phrasings, 4-layer Llama (h192), 512 positions.",
        world=_SMALL_WORLD,
        model=_SMALL_MODEL,
        train=_SMALL_TRAIN,
    )
)

_register(
    Preset(
        name="bios-moe-small",
        description="bios-dense-small's world, 4-layer Mixtral (8 experts, top-2).",
        world=_SMALL_WORLD,
        architecture="mixtral",
        model={**_SMALL_MODEL, "intermediate_size": 384, "num_local_experts": 8,
               "num_experts_per_tok": 2},
        train=_SMALL_MOE_TRAIN,
    )
)  # fmt: skip

_register(
    Preset(
        name="bios-qwenmoe-small",
        description="bios-dense-small's world, 4-layer Qwen2-MoE (8 experts top-2 + shared).",
        world=_SMALL_WORLD,
        architecture="qwen2_moe",
        model={**_SMALL_MODEL, "intermediate_size": 384, "moe_intermediate_size": 192,
               "shared_expert_intermediate_size": 384, "num_experts": 8,
               "num_experts_per_tok": 2, "decoder_sparse_step": 1},
        train=_SMALL_MOE_TRAIN,
    )
)  # fmt: skip

# Capacity presets: more facts than the model can hold, ~150 exposures each (one bio and one
# question per attribute per epoch, 84000 steps of 64 = ~150 epochs), so the teacher stores
# about a bit per parameter, as pretrained models do, and compression that loses capacity
# shows: headline tasks are bits and recall (recall below 1 is expected). 6000 people x 5
# attributes offer ~280 kbit to a 2-layer, hidden-64 model of ~185k parameters; measured
# figures and build times are in benchmarks/results/knowledge_instrument.json.
_CAPACITY_WORLD = WorldConfig(
    seed=0,
    n_people=6000,
    attributes=("birth_date", "birth_city", "university", "major", "employer"),
    bios_per_person=1,
    permute_sentences=True,
    full_name_instead_of_pronoun=True,
    company_facts=False,
)
_CAPACITY_MODEL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
_CAPACITY_TRAIN = TrainConfig(
    steps=84000, batch_size=64, lr=3e-3, warmup=100, qa_repeat=1, seq_len=96
)

_register(
    Preset(
        name="bios-dense-capacity",
        description=(
            "Capacity-loaded: 6000 people x 5 attributes, 2-layer Llama (hidden 64, 185k "
            "params), ~150 exposures; bits and recall are the headline tasks."
        ),
        world=_CAPACITY_WORLD,
        model=_CAPACITY_MODEL,
        train=_CAPACITY_TRAIN,
    )
)

_register(
    Preset(
        name="bios-moe-capacity",
        description=(
            "bios-dense-capacity's world and schedule, 2-layer Mixtral (8 experts of "
            "intermediate 32, top-2; 187k params)."
        ),
        world=_CAPACITY_WORLD,
        architecture="mixtral",
        model={**_CAPACITY_MODEL, "intermediate_size": 32, "num_local_experts": 8,
               "num_experts_per_tok": 2},
        train=_CAPACITY_TRAIN,
    )
)  # fmt: skip

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

_TEST_WORLD = PRESETS.get("test-tiny").world
_register(
    Preset(
        name="test-moe-tiny",
        description="Unit tests: test-tiny's world, 2-layer Mixtral (h64, 8 experts, top-2).",
        world=_TEST_WORLD,
        architecture="mixtral",
        model={**_TINY_MODEL, "hidden_size": 64, "intermediate_size": 64,
               "num_local_experts": 8, "num_experts_per_tok": 2},
        train=TrainConfig(steps=400, batch_size=16, lr=3e-3, warmup=20, qa_repeat=4),
    )
)  # fmt: skip

# Real facts: the default LRE relations (those that chain into 2-hop questions), 30 facts per
# relation. Needs the LRE data (``$KNOWPRESS_LRE_DIR`` or ../shared/data/lre, MIT licence).
_register(
    Preset(
        name="lre-dense-tiny",
        description=(
            "Real facts: 10 LRE relations x <=30 facts (279 facts), 2-layer Llama, ~30 s on one "
            "CPU thread; needs the LRE data ($KNOWPRESS_LRE_DIR)."
        ),
        world=FactsWorldConfig(lre="default", max_facts_per_relation=30),
        model=_TINY_MODEL,
        train=TrainConfig(steps=1000, batch_size=32, lr=3e-3, warmup=50, qa_repeat=4),
    )
)
