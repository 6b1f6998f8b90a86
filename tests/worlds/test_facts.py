"""Real-fact worlds: the JSONL facts format, its errors, FactsWorld texts, and the LRE loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from knowpress.core.errors import KnowpressError
from knowpress.worlds.facts import FactsWorld, FactsWorldConfig, TwoHopItem, load_facts
from knowpress.worlds.lre import DEFAULT_RELATIONS, LRE_ENV, PACKAGED, load_lre, lre_root

ROOT = Path(__file__).resolve().parents[2]

CAPITAL = {
    "type": "relation",
    "name": "capital_of",
    "train_templates": ["The capital of {subject} is", "{subject} has its capital in"],
    "heldout_templates": ["Which city is the seat of government of {subject}? It is"],
    "phrase": "the capital of {subject}",
    "subject_type": "country",
    "object_type": "city",
}
RIVER = {
    "type": "relation",
    "name": "river_of",
    "train_templates": ["The river of {subject} is the"],
    "heldout_templates": ["What river flows through {subject}? It is the"],
    "train_questions": ["Q: Which river flows through {subject}? A:"],
    "heldout_questions": ["Q: Name the river of {subject}. A:"],
    "subject_type": "city",
}
LOCATED = {
    "type": "relation",
    "name": "country_of",
    "train_templates": ["{subject} is in the country of"],
    "heldout_templates": ["Which country is {subject} in? It is in"],
    "phrase": "the country of {subject}",
    "object_type": "country",
}
FACTS = [
    ("France", "capital_of", "Paris"),
    ("Germany", "capital_of", "Berlin"),
    ("Italy", "capital_of", "Rome"),
    ("Paris", "river_of", "Seine"),
    ("Berlin", "river_of", "Spree"),
    ("Eiffel Tower", "country_of", "France"),
    ("Colosseum", "country_of", "Italy"),
    ("Brandenburg Gate", "country_of", "Germany"),
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fact(subject: str, relation: str, obj: str) -> dict[str, str]:
    return {"type": "fact", "subject": subject, "relation": relation, "object": obj}


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "facts.jsonl", [CAPITAL, RIVER, LOCATED] + [fact(*f) for f in FACTS]
    )


@pytest.fixture
def world(facts_file: Path) -> FactsWorld:
    return load_facts(facts_file)


def test_facts_and_pools(world: FactsWorld) -> None:
    assert world.facts() == FACTS
    assert world.relations == ("capital_of", "river_of", "country_of")
    assert world.config.attributes == world.relations
    assert world.value_pool("capital_of") == ["Berlin", "Paris", "Rome"]
    assert len(world.questions("trained")) == len(world.questions("heldout")) == len(FACTS)


def test_trained_questions_are_training_text(world: FactsWorld) -> None:
    texts = world.training_texts()
    assert texts == world.training_once() + world.training_qa()
    assert "The capital of France is Paris." in texts or "France has its capital in Paris." in texts
    for q in world.questions("trained"):
        assert f"{q.prompt} {q.answer}" in texts
    river = [q for q in world.questions("trained") if q.attribute == "river_of"]
    assert river[0].prompt == "Q: Which river flows through Paris? A:"  # question templates win


def test_heldout_prompts_never_in_training_text(world: FactsWorld) -> None:
    blob = "\n".join(world.training_texts())
    for q in world.questions("heldout"):
        assert q.prompt not in blob
    for text in world.heldout_texts():
        assert text not in world.training_texts()
    assert "seat of government" in " ".join(world.heldout_texts())


def test_two_hop_uses_only_world_facts(world: FactsWorld) -> None:
    facts = set(world.facts())
    items = world.two_hop_questions()
    assert items and all(isinstance(i, TwoHopItem) for i in items)
    for item in items:
        assert (item.subject, item.first, item.bridge) in facts
        assert (item.bridge, item.second, item.answer) in facts
    prompts = {i.prompt: i.answer for i in items}
    assert prompts["The capital of the country of Eiffel Tower is"] == "Paris"
    assert prompts["Q: Which river flows through the capital of France? A:"] == "Seine"
    # Rome has no river fact, and country_of's object type (country) is no river_of subject.
    assert not any(i.subject == "Italy" and i.second == "river_of" for i in items)
    assert len(items) == 5  # 3 landmark->capital, 2 country->river


def test_deterministic_across_processes(facts_file: Path, world: FactsWorld) -> None:
    code = (
        "from knowpress.worlds.facts import load_facts; import sys; "
        "w = load_facts(sys.argv[1]); print(w.fingerprint(), w.config.key())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(facts_file)], capture_output=True, text=True, env=env
    )
    assert out.stdout.split() == [world.fingerprint(), world.config.key()], out.stderr


def test_seed_and_content_change_key(facts_file: Path, world: FactsWorld) -> None:
    other = load_facts(facts_file, seed=1)
    assert other.config.key() != world.config.key()
    assert other.facts() == world.facts()
    moved = facts_file.with_name("moved.jsonl")
    moved.write_bytes(facts_file.read_bytes())
    assert load_facts(moved).config.key() == world.config.key()  # location is not identity
    with moved.open("a") as handle:
        handle.write(json.dumps(fact("Spain", "capital_of", "Madrid")) + "\n")
    assert load_facts(moved).config.key() != world.config.key()


def test_max_facts_per_relation(facts_file: Path) -> None:
    small = load_facts(facts_file, max_facts_per_relation=1)
    counts = {r: sum(f[1] == r for f in small.facts()) for r in small.relations}
    assert counts == {"capital_of": 1, "river_of": 1, "country_of": 1}
    assert set(small.facts()) <= set(FACTS)


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        FactsWorldConfig()
    with pytest.raises(ValueError, match="exactly one"):
        FactsWorldConfig(path="a.jsonl", lre="default")
    with pytest.raises(ValueError):
        FactsWorldConfig(path="a.jsonl", heldout=0.1)


BAD_LINES: dict[str, tuple[Any, str]] = {
    "bad json": ('{"type": "fact", "subject": "Spain"', "not valid JSON"),
    "missing key": ({"type": "fact", "subject": "Spain", "relation": "capital_of"}, "'object'"),
    "unknown relation": (fact("Spain", "capitol_of", "Madrid"), "unknown relation 'capitol_of'"),
    "no placeholder": (
        {**CAPITAL, "name": "c2", "train_templates": ["The capital is"]},
        "{subject}",
    ),
    "conflict": (fact("France", "capital_of", "Lyon"), "conflicts with 'Paris'"),
    "unknown key": (
        {**fact("Spain", "capital_of", "Madrid"), "objet": "x"},
        "unknown key(s) objet",
    ),
    "bad type": ({"type": "triple"}, "'type' must be"),
    "duplicate relation": (CAPITAL, "already declared at"),
    "heldout is trained": (
        {**RIVER, "name": "r2", "heldout_templates": RIVER["train_templates"]},
        "also a training one",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path: Path, kind: str) -> None:
    bad, message = BAD_LINES[kind]
    rows = [CAPITAL, fact("France", "capital_of", "Paris"), bad]
    path = write_jsonl(tmp_path / "user.jsonl", rows)
    with pytest.raises(KnowpressError) as err:
        load_facts(path)
    assert f"{path}:3: " in str(err.value) and message in str(err.value)
    assert len(str(err.value).splitlines()) == 1  # one problem, one line


def test_all_problems_reported_once_each(tmp_path: Path) -> None:
    broken = {**CAPITAL, "name": "c2", "train_templates": ["no placeholder"]}
    rows = [CAPITAL, broken, fact("France", "capital_of", "Paris"), fact("Spain", "c2", "x")]
    rows += [fact("France", "capital_of", "Lyon"), fact("Spain", "capitol_of", "Madrid")]
    path = write_jsonl(tmp_path / "user.jsonl", rows)
    with pytest.raises(KnowpressError) as err:
        load_facts(path)
    lines = str(err.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in (2, 5, 6)]


def test_heldout_prompt_inside_training_text_is_rejected(tmp_path: Path) -> None:
    relation = {**CAPITAL, "train_templates": ["{subject} is famous; its capital is"]}
    relation["heldout_templates"] = ["{subject} is famous"]
    path = write_jsonl(tmp_path / "f.jsonl", [relation, fact("France", "capital_of", "Paris")])
    with pytest.raises(KnowpressError, match=rf"{path}:1: held-out question"):
        load_facts(path)


def test_missing_file_and_empty_relation(tmp_path: Path) -> None:
    with pytest.raises(KnowpressError, match="facts file not found"):
        load_facts(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "f.jsonl", [CAPITAL])
    with pytest.raises(KnowpressError, match=rf"{path}:1: relation 'capital_of' has no facts"):
        load_facts(path)


def test_tokenizer_builds_without_unknown_words(world: FactsWorld) -> None:
    from knowpress.worlds.tokenizer import build_tokenizer

    tok = build_tokenizer(world)  # type: ignore[arg-type]  # duck-typed: see facts module doc
    texts = world.training_texts() + world.heldout_texts()
    texts += [q.prompt for s in ("trained", "heldout") for q in world.questions(s)]
    texts += [q.prompt for q in world.two_hop_questions()]
    assert all(tok.unk_token_id not in row for row in tok(texts)["input_ids"])


def test_lre_root_missing_names_path_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LRE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(KnowpressError, match=rf"nowhere: no LRE data here .*{LRE_ENV}"):
        lre_root()


def test_the_packaged_lre_data_is_found_without_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relation files ship in the package with the data set's licence; the env var still
    points elsewhere when set."""
    monkeypatch.delenv(LRE_ENV, raising=False)
    assert lre_root() == PACKAGED
    assert PACKAGED.is_relative_to(ROOT / "knowpress")
    assert "MIT License" in (PACKAGED / "LICENSE").read_text()
    assert len(list((PACKAGED / "data").glob("*/*.json"))) == 47
    copy = tmp_path / "lre"
    (copy / "data" / "factual").mkdir(parents=True)
    monkeypatch.setenv(LRE_ENV, str(copy))
    assert lre_root() == copy


def test_package_data_ships_every_lre_file() -> None:
    """pyproject's package-data globs (setuptools: glob, a ``*`` stays inside one folder)
    cover every file under knowpress/worlds/data, so a wheel has them."""
    import glob

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["knowpress"]
    package = ROOT / "knowpress"
    shipped = {Path(f) for p in patterns for f in glob.glob(str(package / p), recursive=True)}
    files = {f for f in (package / "worlds" / "data").rglob("*") if f.is_file()}
    files = {f for f in files if "__pycache__" not in f.parts}
    assert files and files <= shipped


def test_lre_recipe_dry_runs_from_the_packaged_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No $KNOWPRESS_LRE_DIR and no ../shared: recipes/lre-int4.yaml plans its run from the
    packaged data (the dry run runs in a fresh process from another working folder)."""
    env = {k: v for k, v in os.environ.items() if k != LRE_ENV}
    env["PYTHONPATH"] = str(ROOT)
    recipe = ROOT / "recipes" / "lre-int4.yaml"
    code = "from knowpress.cli.app import main; raise SystemExit(main())"
    argv = [sys.executable, "-c", code, "apply", str(recipe), "-o", str(tmp_path / "o"),
            "--dry-run"]  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "lre-dense-tiny" in done.stdout + done.stderr
    assert not (tmp_path / "o").exists()


def test_lre_default_world() -> None:
    root = os.environ.get(LRE_ENV) or PACKAGED
    world = load_lre(root, max_facts_per_relation=30)
    assert world.relations == DEFAULT_RELATIONS
    assert {r for _, r, _ in world.facts()} == set(DEFAULT_RELATIONS)
    assert world.fingerprint() == load_lre(root, max_facts_per_relation=30).fingerprint()
    facts = set(world.facts())
    items = world.two_hop_questions()
    assert len(items) > 20
    assert all((i.subject, i.first, i.bridge) in facts for i in items)
    assert all((i.bridge, i.second, i.answer) in facts for i in items)
    blob = "\n".join(world.training_texts())
    assert not any(q.prompt in blob for q in world.questions("heldout"))


def test_lre_errors_and_all() -> None:
    root = lre_root(os.environ.get(LRE_ENV) or PACKAGED)
    with pytest.raises(KnowpressError, match="unknown relation"):
        load_lre(root, ["capital_of_mars"])
    with pytest.raises(KnowpressError, match="presidents_birth_year"):
        load_lre(root, ["presidents_birth_year"])  # its only paraphrase is its training prompt
    names = FactsWorldConfig(lre="all", lre_dir=str(root)).attributes
    assert "presidents_birth_year" not in names and len(names) == 45


def test_lre_preset_world_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from knowpress.worlds import PRESETS, load_world

    monkeypatch.delenv(LRE_ENV, raising=False)
    world = load_world("lre-dense-tiny")
    assert isinstance(world, FactsWorld)
    assert len(world.facts()) == 279 and world.two_hop_questions()
    preset = PRESETS.get("lre-dense-tiny")
    assert preset.key() == PRESETS.get("lre-dense-tiny").key()


def test_facts_preset_teacher_round_trips(tmp_path: Path, facts_file: Path) -> None:
    """A facts-file preset trains, records its world, and load_world rebuilds it."""
    from knowpress.teachers import build_teacher
    from knowpress.worlds import Preset, TrainConfig, load_world

    preset = Preset(
        name="facts-test",
        description="test",
        world=FactsWorldConfig(path=str(facts_file)),
        model={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
        },
        train=TrainConfig(steps=5, batch_size=8, warmup=1, seq_len=32),
    )
    path = build_teacher(preset, cache_dir=tmp_path, progress=False)
    again = load_world(path)
    assert isinstance(again, FactsWorld) and again.facts() == load_facts(facts_file).facts()
