"""Deterministic bioS-style world generation (Physics of LMs 3.1).

Every random choice comes from a local ``random.Random`` seeded with the string
``f"knowpress-world:{seed}:{stream}"`` (string seeds are hashed with SHA-512 by CPython, so
they do not depend on ``PYTHONHASHSEED``). One stream per purpose -- ``names``,
``values:<attribute>``, ``bios``, ``heldout-bios``, ``questions:<split>`` -- so adding an
attribute or a bio does not reshuffle anything else.

Value pools do not depend on the world seed: pool ``a`` of size n is the first n items of
a fixed shuffle of the word-list combinations (so a pool of 100 is a prefix of the pool of
200, and the tokenizer vocabulary is stable across seeds).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from knowpress.world import words
from knowpress.world.config import WorldConfig
from knowpress.world.templates import TEMPLATES

Split = Literal["trained", "heldout"]
FIRST_BIRTH_YEAR = 1900


@dataclass(frozen=True)
class QAItem:
    """One question: ``prompt`` ends with ``"A:"``; the model should continue with ``answer``."""

    prompt: str
    answer: str
    subject: str
    attribute: str


@dataclass(frozen=True)
class Person:
    """A person: unique ``first middle last`` name and one value per world attribute."""

    first: str
    middle: str
    last: str
    values: dict[str, str] = field(hash=False)

    @property
    def name(self) -> str:
        return f"{self.first} {self.middle} {self.last}"


def value_pool(attribute: str, size: int) -> list[str]:
    """The first ``size`` values of ``attribute``'s fixed pool (independent of the world seed).

    ``birth_date``: ``size`` is the number of years; values are ``"{day} {month} {year}"``
    for days 1-28, all 12 months and years from 1900 (12 x 28 x size values, in date order).
    """
    if attribute == "birth_date":
        return [
            f"{day} {month} {year}"
            for year in range(FIRST_BIRTH_YEAR, FIRST_BIRTH_YEAR + size)
            for month in words.MONTHS
            for day in range(1, 29)
        ]
    if attribute == "birth_city":
        candidates = [f.format(r) for r in words.CITY_ROOTS for f in words.CITY_FORMS]
    elif attribute == "university":
        candidates = [f.format(r) for r in words.UNIVERSITY_ROOTS for f in words.UNIVERSITY_FORMS]
    elif attribute == "major":
        candidates = list(words.MAJORS)
    elif attribute == "employer":
        candidates = [f"{r} {s}" for r in words.EMPLOYER_ROOTS for s in words.EMPLOYER_SUFFIXES]
    else:
        raise ValueError(f"unknown attribute {attribute!r}")
    if size > len(candidates):
        raise ValueError(f"{attribute} pool has only {len(candidates)} values, asked for {size}")
    # A fixed shuffle so small pools mix all forms ("Port X", "X Falls"...) instead of one root.
    random.Random(f"knowpress-pool:{attribute}").shuffle(candidates)
    return candidates[:size]


def _pool_size_arg(config: WorldConfig, attribute: str) -> int:
    return config.pools.birth_years if attribute == "birth_date" else config.pools.size(attribute)


class World:
    """People and their facts, plus every text rendered from them. Build with ``generate_world``."""

    def __init__(self, config: WorldConfig, people: list[Person]) -> None:
        self.config = config
        self.people = people
        self._pools: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"World(key={self.config.key()}, people={len(self.people)})"

    def _rng(self, stream: str) -> random.Random:
        return _stream(self.config.seed, stream)

    def value_pool(self, attribute: str) -> list[str]:
        """All values ``attribute`` can take in this world (|S_a| = its length)."""
        if attribute not in self.config.attributes:
            raise ValueError(f"attribute {attribute!r} is not in this world")
        if attribute not in self._pools:
            self._pools[attribute] = value_pool(attribute, _pool_size_arg(self.config, attribute))
        return list(self._pools[attribute])

    def facts(self) -> list[tuple[str, str, str]]:
        """``(subject, attribute, value)`` for every person x attribute, person-major."""
        return [(p.name, a, p.values[a]) for p in self.people for a in self.config.attributes]

    def bio(self, person: Person, rng: random.Random) -> str:
        """One biography: a sentence per attribute (random template), optionally permuted."""
        sentences = [
            rng.choice(TEMPLATES[a].bio).format(name=person.name, value=person.values[a])
            for a in self.config.attributes
        ]
        if self.config.permute_sentences:
            rng.shuffle(sentences)
        return " ".join(sentences)

    @cached_property
    def _training_bios(self) -> list[list[str]]:
        rng = self._rng("bios")
        return [[self.bio(p, rng) for _ in range(self.config.bios_per_person)] for p in self.people]

    def training_bios(self) -> list[str]:
        """``bios_per_person`` biographies per person, person-major."""
        return [bio for bios in self._training_bios for bio in bios]

    def training_qa(self) -> list[str]:
        """``prompt + " " + answer`` for every fact and every trained question template."""
        return [
            template.format(name=p.name) + " " + p.values[a]
            for p in self.people
            for a in self.config.attributes
            for template in TEMPLATES[a].trained
        ]

    def training_texts(self) -> list[str]:
        """Everything the teacher trains on: ``training_bios() + training_qa()``."""
        return self.training_bios() + self.training_qa()

    def questions(self, split: Split) -> list[QAItem]:
        """One question per person x attribute (person-major), in the ``split`` phrasing.

        ``trained``: the exact QA format of the training text. ``heldout``: templates that
        never occur in training. With several templates per split, each item picks one from
        the ``questions:<split>`` stream.
        """
        if split not in ("trained", "heldout"):
            raise ValueError(f"split must be 'trained' or 'heldout', not {split!r}")
        rng = self._rng(f"questions:{split}")
        items = []
        for p in self.people:
            for a in self.config.attributes:
                template = rng.choice(getattr(TEMPLATES[a], split))
                items.append(QAItem(template.format(name=p.name), p.values[a], p.name, a))
        return items

    def heldout_texts(self, n: int | None = None) -> list[str]:
        """``n`` biographies (default: one per person, cycling) from the ``heldout-bios`` stream.

        A rendering identical to one of the person's training bios is redrawn (up to 32
        times), so the texts are unseen verbatim whenever the templates allow it.
        """
        rng = self._rng("heldout-bios")
        count = len(self.people) if n is None else n
        out = []
        for i in range(count):
            index = i % len(self.people)
            person, seen = self.people[index], set(self._training_bios[index])
            text = self.bio(person, rng)
            for _ in range(32):
                if text not in seen:
                    break
                text = self.bio(person, rng)
            out.append(text)
        return out

    def fingerprint(self) -> str:
        """sha256 hex of the JSON of facts, training texts, both question splits, held-out texts.

        Recorded next to a teacher so ``load_world`` can detect a world that no longer
        regenerates identically (a changed generator).
        """
        payload = {
            "facts": self.facts(),
            "train": self.training_texts(),
            "questions": {s: [vars(q) for q in self.questions(s)] for s in ("trained", "heldout")},
            "heldout_texts": self.heldout_texts(),
        }
        text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def template_words(self) -> list[str]:
        """Every template in this world (bio, trained, held-out), for vocabulary building."""
        out: list[str] = []
        for a in self.config.attributes:
            t = TEMPLATES[a]
            out.extend([*t.bio, *t.trained, *t.heldout])
        return out


def _stream(seed: int, stream: str) -> random.Random:
    return random.Random(f"knowpress-world:{seed}:{stream}")


def _draw_names(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    first, last = words.FIRST_NAMES, words.LAST_NAMES
    capacity = len(first) * (len(first) - 1) * len(last)
    if n > capacity // 2:  # rejection sampling slows down near capacity
        raise ValueError(f"n_people={n} is too many for the name lists (max {capacity // 2})")
    seen: set[tuple[str, str, str]] = set()
    names: list[tuple[str, str, str]] = []
    while len(names) < n:
        f, m, la = rng.choice(first), rng.choice(first), rng.choice(last)
        if f != m and (f, m, la) not in seen:
            seen.add((f, m, la))
            names.append((f, m, la))
    return names


def generate_world(config: WorldConfig) -> World:
    """Build the world for ``config``; the same config gives the same world in any process."""
    names = _draw_names(config.n_people, _stream(config.seed, "names"))
    values: dict[str, Sequence[str]] = {}
    for attribute in config.attributes:
        pool = value_pool(attribute, _pool_size_arg(config, attribute))
        rng = _stream(config.seed, f"values:{attribute}")
        values[attribute] = [pool[rng.randrange(len(pool))] for _ in names]
    people = [
        Person(f, m, la, {a: values[a][i] for a in config.attributes})
        for i, (f, m, la) in enumerate(names)
    ]
    return World(config, people)
