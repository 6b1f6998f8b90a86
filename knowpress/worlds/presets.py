"""The registered teacher presets (``preset_spec.py`` says what a preset is and how its key
is computed): tiny ones for the quickstart and tests, small and capacity ones for benchmarks.
"""

from __future__ import annotations

from typing import Any

from knowpress.worlds.config import PoolSizes, WorldConfig
from knowpress.worlds.facts import FactsWorldConfig
from knowpress.worlds.preset_spec import (
    ARCHITECTURES,
    PRESETS,
    TEACHER_VERSION,
    Architecture,
    Preset,
    TrainConfig,
    _register,
)

__all__ = ["ARCHITECTURES", "PRESETS", "TEACHER_VERSION", "Architecture", "Preset", "TrainConfig"]

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
# relation. The LRE data (MIT licence) ships in knowpress/worlds/data/lre; $KNOWPRESS_LRE_DIR
# points at another copy.
_register(
    Preset(
        name="lre-dense-tiny",
        description=(
            "Real facts: 10 LRE relations x <=30 facts (279 facts), 2-layer Llama, ~30 s on one "
            "CPU thread; LRE data packaged (or $KNOWPRESS_LRE_DIR)."
        ),
        world=FactsWorldConfig(lre="default", max_facts_per_relation=30),
        model=_TINY_MODEL,
        train=TrainConfig(steps=1000, batch_size=32, lr=3e-3, warmup=50, qa_repeat=4),
    )
)
