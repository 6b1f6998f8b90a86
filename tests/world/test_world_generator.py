"""The synthetic world generator: determinism, uniqueness, pools, template split."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from knowpress.testing import tiny_world
from knowpress.world import (
    PRESETS,
    PoolSizes,
    WorldConfig,
    generate_world,
    value_pool,
)
from knowpress.world.templates import TEMPLATES, stem

CFG = WorldConfig(seed=3, n_people=60, bios_per_person=2)


def test_same_config_same_world() -> None:
    a, b = generate_world(CFG), generate_world(WorldConfig.model_validate(CFG.model_dump()))
    assert a.facts() == b.facts()
    assert a.training_texts() == b.training_texts()
    assert a.questions("trained") == b.questions("trained")
    assert a.questions("heldout") == b.questions("heldout")
    assert a.heldout_texts(10) == b.heldout_texts(10)
    assert a.fingerprint() == b.fingerprint()


def test_fresh_process_gives_the_same_world() -> None:
    # Another PYTHONHASHSEED would expose any dependence on set or dict-of-str hash order.
    code = (
        "from knowpress.world import WorldConfig, generate_world\n"
        f"cfg = WorldConfig.model_validate_json({CFG.model_dump_json()!r})\n"
        "print(generate_world(cfg).fingerprint())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == generate_world(CFG).fingerprint()


def test_different_seed_different_facts() -> None:
    other = generate_world(CFG.model_copy(update={"seed": 4}))
    assert other.facts() != generate_world(CFG).facts()


def test_names_unique_and_full() -> None:
    world = generate_world(WorldConfig(n_people=2000))
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == 2000
    assert all(len(n.split()) == 3 for n in names)


def test_pools_have_configured_sizes_and_hold_every_value() -> None:
    world = generate_world(CFG)
    expected = {"birth_date": 12 * 28 * 200, "birth_city": 200, "university": 300}
    expected |= {"major": 100, "employer": 263}
    for attribute, size in expected.items():
        pool = world.value_pool(attribute)
        assert len(pool) == len(set(pool)) == size == CFG.pools.size(attribute)
    pools = {a: set(world.value_pool(a)) for a in CFG.attributes}
    facts = world.facts()
    assert len(facts) == CFG.n_people * len(CFG.attributes)
    assert all(value in pools[attribute] for _, attribute, value in facts)


def test_small_pool_is_prefix_and_values_are_plain_words() -> None:
    assert value_pool("birth_city", 50) == value_pool("birth_city", 200)[:50]
    for attribute in ("birth_city", "university", "major", "employer"):
        for value in value_pool(attribute, 100):
            assert all(w.isalpha() for w in value.split()), value
            assert not {"a", "an", "the"} & {w.lower() for w in value.split()}


def test_held_out_question_stems_never_in_training() -> None:
    world = generate_world(CFG)
    corpus = "\n".join(world.training_texts())
    trained_stems = {stem(t) for a in CFG.attributes for t in TEMPLATES[a].trained}
    for attribute in CFG.attributes:
        for template in TEMPLATES[attribute].heldout:
            assert stem(template) not in corpus, template
            assert stem(template) not in trained_stems
    for item in world.questions("heldout"):
        assert item.prompt not in corpus


def test_trained_questions_appear_verbatim_in_training() -> None:
    world = generate_world(CFG)
    texts = set(world.training_texts())
    items = world.questions("trained")
    assert len(items) == CFG.n_people * len(CFG.attributes)
    assert all(f"{q.prompt} {q.answer}" in texts for q in items)
    assert all(q.prompt.startswith("Q: ") and q.prompt.endswith(" A:") for q in items)


def test_training_text_counts_and_heldout_texts_unseen() -> None:
    world = generate_world(CFG)
    bios = world.training_bios()
    assert len(bios) == CFG.n_people * CFG.bios_per_person
    assert len(world.training_texts()) == len(bios) + CFG.n_people * len(CFG.attributes)
    heldout = world.heldout_texts()
    assert len(heldout) == CFG.n_people and not set(heldout) & set(bios)
    assert len(world.heldout_texts(150)) == 150
    first = world.people[0]
    assert all(first.name in s for s in bios[0].split(". "))  # every sentence names the person


def test_config_key_and_validation() -> None:
    assert CFG.key() == WorldConfig.model_validate_json(CFG.model_dump_json()).key()
    assert len(CFG.key()) == 12 and CFG.key() != CFG.model_copy(update={"seed": 9}).key()
    with pytest.raises(ValidationError):
        WorldConfig(n_people=10, colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="unknown attribute"):
        WorldConfig(attributes=("birth_city", "shoe_size"))
    with pytest.raises(ValidationError, match="exceeds"):
        WorldConfig(pools=PoolSizes(major=1000))
    with pytest.raises(ValidationError):
        CFG.seed = 5  # type: ignore[misc]  # frozen


def test_tiny_world_is_the_test_preset() -> None:
    world = tiny_world()
    assert world.config == PRESETS.get("test-tiny").world
    assert len(world.questions("trained")) == len(world.facts())
    with pytest.raises(ValueError, match="split"):
        world.questions("train")  # type: ignore[arg-type]
