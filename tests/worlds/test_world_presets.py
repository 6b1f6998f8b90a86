"""Preset architectures: every registered preset builds, and MoE teachers train and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.io import load_model
from knowpress.runtimes.torch import TorchRuntime
from knowpress.teachers import build_teacher
from knowpress.teachers.training import make_model
from knowpress.worlds import PRESETS, Preset, WorldConfig, build_tokenizer
from knowpress.worlds.facts import FactsWorldConfig
from knowpress.worlds.generator import generate_world
from knowpress.worlds.presets import ARCHITECTURES
from knowpress.worlds.store import make_world

MICRO_WORLD = WorldConfig(
    n_people=6, attributes=("major", "employer", "pronoun"), bios_per_person=1,
    in_context_examples=4, in_context_bios=2,
)  # fmt: skip
MICRO_MODELS = {
    "llama": {},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                  "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                  "decoder_sparse_step": 1, "head_dim": 16},
}  # fmt: skip
BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 256}  # fmt: skip


def test_copy_fields_enter_the_key_only_when_used() -> None:
    base = PRESETS.get("bios-dense-tiny-full")
    assert base.train.copy_examples == 0

    def with_train(**update: object) -> Preset:
        return base.model_copy(update={"train": base.train.model_copy(update=update)})

    assert with_train(copy_span=(2, 3)).key() == base.key()  # unused: teachers keep keys
    assert with_train(copy_examples=1).key() != base.key()
    assert with_train(copy_examples=1).key() != with_train(copy_examples=1, copy_span=(2, 3)).key()


def test_micro_matrix_covers_every_architecture() -> None:
    assert set(MICRO_MODELS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_builds_its_model(name: str) -> None:
    preset = PRESETS.get(name)
    if isinstance(preset.world, FactsWorldConfig):
        try:
            world = make_world(preset.world)
        except KnowpressError as exc:  # real-fact data not on this machine
            pytest.skip(str(exc))
    else:
        world = generate_world(
            preset.world.model_copy(update={"n_people": 4, "in_context_examples": 2})
        )
    tokenizer = build_tokenizer(world)
    model = make_model(preset, tokenizer)
    assert type(model).__name__ == ARCHITECTURES[preset.architecture][1]
    ids = tokenizer(["Q: Where was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    if preset.architecture != "llama":
        config = model.config
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        assert experts >= 8 and config.num_experts_per_tok == 2


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_architecture_trains_saves_and_reloads(architecture: str, tmp_path: Path) -> None:
    preset = Preset(
        name=f"micro-{architecture}",
        description="a few steps per architecture",
        world=MICRO_WORLD,
        architecture=architecture,  # type: ignore[arg-type]
        model={**BASE, **MICRO_MODELS[architecture]},
        train={"steps": 3, "batch_size": 4, "warmup": 1, "seq_len": 256},
    )
    other = "mixtral" if architecture == "llama" else "llama"
    assert preset.key() != preset.model_copy(update={"architecture": other}).key()
    path = build_teacher(preset, cache_dir=tmp_path, progress=False)
    model, tokenizer = load_model(path)
    assert type(model).__name__ == ARCHITECTURES[architecture][1]
    answers = TorchRuntime(model, tokenizer).greedy(["Q: What did"], max_new_tokens=2)
    assert len(answers) == 1
