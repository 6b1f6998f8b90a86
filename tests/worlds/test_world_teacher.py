"""Teacher building: cache layout, atomic install, recall, load_world."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowpress.core.errors import KnowpressError
from knowpress.teachers import build_teacher
from knowpress.teachers.training import recall
from knowpress.testing import tiny_teacher
from knowpress.worlds import (
    PRESETS,
    WORLD_FILE,
    Preset,
    WorldConfig,
    default_cache_dir,
    load_world,
    teacher_dir,
    teacher_info,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knowpress-cache")


BUILD_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def teacher(cache: Path) -> Path:
    start = time.perf_counter()
    path = tiny_teacher(cache)  # trains once for the whole module (~10 s)
    BUILD_SECONDS.append(time.perf_counter() - start)
    return path


def test_teacher_directory_contents(teacher: Path, cache: Path) -> None:
    preset = PRESETS.get("test-tiny")
    assert teacher == cache / "teachers" / f"test-tiny-{preset.key()}" == teacher_dir(preset, cache)
    names = {p.name for p in teacher.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(".bin") for n in names)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", WORLD_FILE} <= names
    info = json.loads((teacher / WORLD_FILE).read_text())
    assert info["preset"] == "test-tiny" and info["preset_key"] == preset.key()
    assert info["train"]["steps"] == preset.train.steps
    assert info["train"]["recall"] >= 0.9
    assert set(info["train"]["scores"]) == {"recall", "paraphrase", "long_context", "bits"}
    assert info["train"]["scores"]["recall"] == info["train"]["recall"]
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    assert 0 < info["train"]["final_loss"] < math.log(vocab) / 4  # far below a uniform guess
    assert 0 < info["train"]["seconds"] < BUILD_SECONDS[0]  # training is part of the build
    assert not [p for p in teacher.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_second_call_uses_the_cache(teacher: Path, cache: Path) -> None:
    stamp = (teacher / WORLD_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    again = build_teacher("test-tiny", cache_dir=cache, progress=False)
    assert again == teacher and time.perf_counter() - start < 2.0
    assert (teacher / WORLD_FILE).stat().st_mtime_ns == stamp


def test_saved_teacher_reloads_and_recalls(teacher: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert tokenizer("Q:")["input_ids"][0] == tokenizer.bos_token_id
    world = load_world(teacher)
    assert recall(model, tokenizer, world.questions("trained")) >= 0.9


def test_load_world_round_trips(teacher: Path) -> None:
    world = load_world(teacher)
    assert world.config == PRESETS.get("test-tiny").world
    assert load_world(str(teacher / WORLD_FILE)).facts() == world.facts()
    assert load_world("test-tiny").facts() == world.facts()
    assert teacher_info(teacher)["world_key"] == world.config.key()


def test_load_world_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(KnowpressError, match="nowhere") as err:
        load_world(missing)
    assert "\n" not in str(err.value)
    with pytest.raises(KnowpressError, match="test-tiny"):
        load_world("test-tiny2")  # a near-miss preset name gets a suggestion
    (tmp_path / WORLD_FILE).write_text("{not json")
    with pytest.raises(KnowpressError, match=str(tmp_path)):
        load_world(tmp_path)
    (tmp_path / WORLD_FILE).write_text(json.dumps({"world": {"n_people": -1}}))
    with pytest.raises(KnowpressError, match="n_people"):
        load_world(tmp_path)


def test_changed_generator_is_detected(teacher: Path, tmp_path: Path) -> None:
    info = teacher_info(teacher)
    info["world_fingerprint"] = "0" * 64
    (tmp_path / WORLD_FILE).write_text(json.dumps(info))
    with pytest.raises(KnowpressError, match="force=True"):
        load_world(tmp_path)


def test_force_rebuilds_in_place(tmp_path: Path) -> None:
    small = Preset(
        name="micro",
        description="a few steps, for the force test",
        world=WorldConfig(n_people=4, attributes=("major",), bios_per_person=1),
        model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2},
        train={"steps": 3, "batch_size": 4, "warmup": 1},
    )  # fmt: skip
    first = build_teacher(small, cache_dir=tmp_path, progress=True)
    stamp = (first / WORLD_FILE).stat().st_mtime_ns
    second = build_teacher(small, cache_dir=tmp_path, force=True, progress=False)
    assert second == first and (first / WORLD_FILE).stat().st_mtime_ns != stamp
    assert [p.name for p in (tmp_path / "teachers").iterdir()] == [first.name]


def test_preset_registry_and_keys() -> None:
    assert {"bios-dense-tiny", "test-tiny"} <= set(PRESETS.names())
    with pytest.raises(KnowpressError, match="bios-dense-tiny"):
        PRESETS.get("bios-dense-tyni")
    base = PRESETS.get("test-tiny")
    renamed = base.model_copy(update={"name": "other", "description": "x"})
    assert renamed.key() == base.key()
    slower = Preset.model_validate(
        {**base.model_dump(), "train": {**base.train.model_dump(), "steps": 7}}
    )
    assert slower.key() != base.key()
    with pytest.raises(ValidationError, match="vocab_size"):
        Preset.model_validate({**base.model_dump(), "model": {"vocab_size": 10}})
    for name, preset in PRESETS.items():
        assert preset.name == name


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNOWPRESS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KNOWPRESS_CACHE")
    assert "knowpress" in str(default_cache_dir())
