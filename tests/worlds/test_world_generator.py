"""The synthetic world generator: determinism, uniqueness, pools, template split."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from knowpress.testing import tiny_world
from knowpress.worlds import (
    PRESETS,
    PoolSizes,
    WorldConfig,
    generate_world,
    value_pool,
)
from knowpress.worlds.templates import COMPANY_TEMPLATES, TEMPLATES, TWO_HOP_TEMPLATES, stem

CFG = WorldConfig(seed=3, n_people=60, bios_per_person=2)
ALL = ("birth_date", "birth_city", "university", "major", "employer", "pronoun", "company_city")
# Every extension on: pronouns, the derived company city, company facts, in-context passages.
FULL = WorldConfig(
    seed=5, n_people=40, attributes=ALL, bios_per_person=2, in_context_examples=12,
    in_context_questions=3,
    question_templates=4,
)  # fmt: skip


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
        "from knowpress.worlds import WorldConfig, generate_world\n"
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


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        FULL,
        FULL.model_copy(update={"in_context_style": "facts"}),
        FULL.model_copy(update={"in_context_style": "facts", "in_context_lookup": 0.5}),
    ],
    ids=["default", "full", "facts", "facts-lookup"],
)
def test_held_out_question_stems_never_in_training(cfg: WorldConfig) -> None:
    world = generate_world(cfg)
    corpus = "\n".join(world.training_texts())
    trained_stems = {stem(t) for a in ALL for t in TEMPLATES[a].trained}
    trained_stems |= {stem(t.replace("{company}", "{name}")) for t in COMPANY_TEMPLATES.trained}
    for template in (*TWO_HOP_TEMPLATES, *COMPANY_TEMPLATES.heldout):
        held = stem(template.replace("{company}", "{name}"))
        assert held not in corpus and held not in trained_stems, template
    for item in world.two_hop_questions():
        assert item.prompt not in corpus
    for attribute in cfg.attributes:
        for template in TEMPLATES[attribute].heldout:
            assert stem(template) not in corpus, template
            assert stem(template) not in trained_stems
    for item in world.questions("heldout"):
        assert item.prompt not in corpus


def test_held_out_questions_use_only_trained_words() -> None:
    """New phrasings of known words: a never-trained word would be an untrained embedding."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    world = generate_world(FULL)
    seen = {w for text in world.training_texts() for w, _ in split(text)}
    questions = [q.prompt for q in world.questions("heldout") + world.two_hop_questions()]
    questions += [t.format(company="Acme") for t in COMPANY_TEMPLATES.heldout]
    for prompt in questions:
        assert {w for w, _ in split(prompt)} - seen - {"Acme"} == set(), prompt


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
    companies = len(world.companies())
    company_texts = companies * CFG.bios_per_person + companies  # sentences + trained QA
    qa = CFG.n_people * len(CFG.attributes)
    assert len(world.training_texts()) == len(bios) + company_texts + qa
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


def test_company_city_is_derived_from_employer() -> None:
    world = generate_world(FULL)
    cities = world.company_cities
    assert set(cities) == set(world.value_pool("employer"))
    assert set(cities.values()) <= set(world.value_pool("company_city"))
    assert all(p.values["company_city"] == cities[p.values["employer"]] for p in world.people)
    # The map depends on the seed and pools only, not on which attributes the world has.
    fewer = generate_world(FULL.model_copy(update={"attributes": ("employer",)}))
    assert fewer.company_cities == cities
    with pytest.raises(ValidationError, match="derived from employer"):
        WorldConfig(attributes=("birth_city", "company_city"))


def test_company_facts_are_in_training_text() -> None:
    world = generate_world(FULL)
    corpus = "\n".join(world.training_texts())
    facts = world.company_facts()
    assert [c for c, _ in facts] == world.companies()
    assert {p.values["employer"] for p in world.people} == {c for c, _ in facts}
    for company, city in facts:
        assert f"Q: Where is {company} headquartered? A: {city}" in corpus
        assert f"Q: Which city is {company} based in? A: {city}" in corpus
        assert any(s.startswith(company) and s.endswith(f" {city}.") for s in corpus.split("\n"))
    off = generate_world(FULL.model_copy(update={"company_facts": False}))
    assert off.company_facts() == [] and off.two_hop_questions() == []
    assert off.training_company_texts() == []
    assert off.training_once() == off.training_bios()


def test_two_hop_items_only_use_facts_the_world_contains() -> None:
    world = generate_world(FULL)
    items = world.two_hop_questions()
    assert len(items) == FULL.n_people
    employer = {s: v for s, a, v in world.facts() if a == "employer"}
    hq = dict(world.company_facts())
    for item in items:
        assert item.subject in item.prompt and item.prompt.endswith(" A:")
        assert item.answer == hq[employer[item.subject]]
    no_employer = generate_world(CFG.model_copy(update={"attributes": ("major",)}))
    assert no_employer.two_hop_questions() == []


def test_bios_use_pronouns_after_the_first_sentence() -> None:
    world = generate_world(FULL)
    person, bio = world.people[0], world.training_bios()[0]
    sentences = bio.split(". ")
    assert sentences[0].startswith(person.name)
    pronoun = person.values["pronoun"].capitalize()
    assert all(s.startswith(pronoun + " ") for s in sentences[1:])
    assert person.values["pronoun"] in ("he", "she")
    full = generate_world(FULL.model_copy(update={"full_name_instead_of_pronoun": True}))
    assert all(s.startswith(person.name) for s in full.training_bios()[0].split(". "))


@pytest.mark.parametrize("full_names", [True, False])
def test_passages_name_the_person_in_every_sentence_when_asked(full_names: bool) -> None:
    world = generate_world(FULL.model_copy(update={"in_context_full_names": full_names}))
    [item] = world.haystack_items(n_bios=1, n_items=1)
    sentences = item.prompt.rsplit(" Q: ", 1)[0].split(". ")
    assert sentences[0].startswith(item.subject)
    assert all(s.startswith(item.subject) for s in sentences) == full_names


def test_facts_style_passages_are_one_fixed_sentence_per_person_and_attribute() -> None:
    facts = FULL.model_copy(update={"in_context_style": "facts"})
    world = generate_world(facts)
    asked = [a for a in ALL if a != "company_city"]
    for item in world.haystack_items(n_bios=3, n_items=5):
        context = item.prompt.rsplit(" Q: ", 1)[0]
        sentences = [s.rstrip(".") + "." for s in context.split(". ")]
        assert len(sentences) == 3 * len(asked)
        subject_facts = [s for s in sentences if f" of {item.subject} is " in s]
        assert len(subject_facts) == len(asked)
        wanted = TEMPLATES[item.attribute].fact.format(name=item.subject, value=item.answer)
        assert wanted in subject_facts
        templates = [TEMPLATES[a].fact.split("{name}")[0] for a in asked]
        assert all(any(s.startswith(t) for t in templates) for s in sentences)
    assert world.training_in_context(0) != generate_world(FULL).training_in_context(0)
    # Only facts worlds add the fact sentences' words to the vocabulary (bios worlds keep
    # their tokenizer), and only they hash the field (bios worlds keep their key).
    fact_texts = [TEMPLATES[a].fact for a in ALL]
    assert set(fact_texts) <= set(world.template_words())
    assert not set(fact_texts) & set(generate_world(FULL).template_words())
    assert "in_context_style" not in FULL.key_fields()
    assert facts.key() != FULL.key() and facts.key_fields()["in_context_style"] == "facts"


@pytest.mark.parametrize("style", ["bios", "facts"])
def test_lookup_passages_state_one_attribute_of_several_people(style: str) -> None:
    lookups = FULL.model_copy(update={"in_context_lookup": 1.0, "in_context_style": style})
    world = generate_world(lookups)
    people = {p.name for p in world.people}
    for passage in world.training_in_context(0):
        sentences = [s.rstrip(".") + "." for s in passage.context.split(". ")]
        assert 2 <= len(sentences) <= 2 * FULL.in_context_bios
        assert 1 <= len(passage.questions) <= min(FULL.in_context_questions, len(sentences))
        [attribute] = {q.attribute for q in passage.questions}
        bio_or_fact = TEMPLATES[attribute].bio if style == "bios" else (TEMPLATES[attribute].fact,)
        for question in passage.questions:
            assert question.subject not in people  # fictional: read, not recalled
            [said] = [s for s in sentences if question.subject in s]
            assert said in {
                t.format(name=question.subject, value=question.answer) for t in bio_or_fact
            }
    mixed = generate_world(FULL.model_copy(update={"in_context_lookup": 0.5}))
    n_lookups = sum(
        len({q.attribute for q in p.questions}) == 1 for p in mixed.training_in_context(0)
    )
    assert 0 < n_lookups < FULL.in_context_examples
    # Worlds without lookups keep their key (and their passages: no extra draws).
    assert "in_context_lookup" not in FULL.key_fields() and lookups.key() != FULL.key()


def test_every_person_attribute_has_a_fact_sentence() -> None:
    for attribute, templates in TEMPLATES.items():
        fact = templates.fact or ""
        assert "{name}" in fact and "{value}" in fact, f"{attribute} needs a fact sentence"


def test_in_context_and_haystack_people_are_fictional() -> None:
    world = generate_world(FULL)
    names = {p.name for p in world.people}
    passages = world.training_in_context()
    assert len(passages) == FULL.in_context_examples
    items = world.haystack_items(n_bios=3, n_items=10)
    assert items == world.haystack_items(n_bios=3, n_items=10)  # deterministic
    for item in items:
        assert item.subject not in names
        context, question = item.prompt.rsplit(" Q: ", 1)
        assert item.subject in context and item.subject in question
        assert item.answer in context  # answerable from the context alone
        assert item.attribute != "company_city"
        assert sum(context.count(f"{n}") for n in names) == 0
    assert not {i.prompt.rsplit(" Q: ", 1)[0] for i in items} & {p.context for p in passages}
    for passage in passages:
        assert 1 <= len(passage.questions) <= FULL.in_context_questions
        asked = [(q.subject, q.attribute) for q in passage.questions]
        assert len(set(asked)) == len(asked)  # distinct questions
        for q in passage.questions:
            assert q.subject not in names and q.answer in passage.context
            assert q.prompt.startswith("Q: ") and q.subject in q.prompt
    with pytest.raises(ValueError, match="n_bios"):
        world.haystack_items(n_bios=0, n_items=1)


def test_question_templates_sets_the_trained_phrasings() -> None:
    world = generate_world(FULL)
    texts = set(world.training_qa())
    assert len(texts) == FULL.n_people * sum(len(world.trained_templates(a)) for a in ALL)
    assert len(world.trained_templates("birth_city")) == 4
    assert world.trained_templates("pronoun") == TEMPLATES["pronoun"].trained  # only 2 exist
    used = {q.prompt.split(" ")[1] for q in world.questions("trained")}
    assert len(used) > 4  # questions draw among every trained phrasing
    assert all(f"{q.prompt} {q.answer}" in texts for q in world.questions("trained"))
    one = generate_world(CFG)
    assert all(one.trained_templates(a) == TEMPLATES[a].trained[:1] for a in CFG.attributes)
