"""In-context passages of fictional people: the reading half of a world's training data and
its ``long_context`` haystacks (``World.training_in_context``, ``World.haystack_items``).

Everything is drawn from the caller's ``random.Random``, so a passage is a pure function of
the world and the stream position.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from knowpress.worlds import words
from knowpress.worlds.items import Passage, Person, QAItem
from knowpress.worlds.templates import TEMPLATES

if TYPE_CHECKING:
    from knowpress.worlds.generator import World


def fictional_people(world: World, n: int, rng: random.Random) -> list[Person]:
    """``n`` people not in the world (fresh names; values drawn from the world's pools)."""
    first, last = words.FIRST_NAMES, words.LAST_NAMES
    drawn: list[tuple[str, str, str]] = []
    while len(drawn) < n:  # rejection: world people and repeats within the passage
        name = (rng.choice(first), rng.choice(first), rng.choice(last))
        if name[0] != name[1] and name not in world.names and name not in drawn:
            drawn.append(name)
    pools = {a: world.value_pool(a) for a in world.config.drawn_attributes}
    people = []
    for f, m, la in drawn:
        values = {a: pool[rng.randrange(len(pool))] for a, pool in pools.items()}
        world.add_derived(values)
        people.append(Person(f, m, la, values))
    return people


def full_passage(world: World, rng: random.Random, n_bios: int, n_questions: int) -> Passage:
    """``n_bios`` bios of fictional people, then ``n_questions`` distinct trained-format
    questions about them (person and attribute drawn without replacement). The answers
    are only in the passage, since the people are not in the world; bios name the person
    in every sentence when ``in_context_full_names``. ``in_context_style: facts``: one
    ``TEMPLATES[a].fact`` sentence per person and attribute, shuffled across people."""
    asked = world.config.drawn_attributes
    people = fictional_people(world, n_bios, rng)
    if world.config.in_context_style == "facts":
        sentences = [
            fact_sentence(a).format(name=p.name, value=p.values[a]) for p in people for a in asked
        ]
        rng.shuffle(sentences)
        context = " ".join(sentences)
    else:
        full = world.config.in_context_full_names
        context = " ".join(world.bio(p, rng, full_names=full) for p in people)
    pairs = [(p, a) for p in people for a in asked]
    questions = tuple(
        QAItem(
            rng.choice(world.trained_templates(a)).format(name=p.name),
            p.values[a],
            p.name,
            a,
        )
        for p, a in rng.sample(pairs, min(n_questions, len(pairs)))
    )
    return Passage(context, questions)


def lookup_passage(world: World, rng: random.Random, n_people: int) -> Passage:
    """One attribute of ``n_people`` fictional people, a sentence each (a random bio
    template with the full name, or the fact sentence in facts style), shuffled; then
    ``min(in_context_questions, n_people)`` questions about that attribute.

    Every sentence holds the asked relation, so only the name finds the answer: this is
    multi-query associative recall (Arora et al. 2023, Zoology, arXiv:2312.04927) with names
    as keys. Full passages alone let a small teacher get by on the relation (it then reads a
    random person's value); these teach the name half of the (name, relation) key."""
    asked = world.config.drawn_attributes
    attribute = rng.choice(asked)
    people = fictional_people(world, n_people, rng)
    facts = world.config.in_context_style == "facts"
    sentences = [
        (fact_sentence(attribute) if facts else rng.choice(TEMPLATES[attribute].bio)).format(
            name=p.name, value=p.values[attribute]
        )
        for p in people
    ]
    rng.shuffle(sentences)
    templates = world.trained_templates(attribute)
    questions = tuple(
        QAItem(rng.choice(templates).format(name=p.name), p.values[attribute], p.name, attribute)
        for p in rng.sample(people, min(world.config.in_context_questions, n_people))
    )
    return Passage(" ".join(sentences), questions)


def fact_sentence(attribute: str) -> str:
    fact = TEMPLATES[attribute].fact
    if fact is None:
        raise ValueError(
            f"attribute {attribute} has no fact sentence for in_context_style: facts; "
            "add AttributeTemplates.fact in knowpress/worlds/templates.py or use style bios"
        )
    return fact
