"""Deterministic bioS-style world generation (Physics of LMs 3.1).

Every random choice comes from a local ``random.Random`` seeded with the string
``f"knowpress-world:{seed}:{stream}"`` (string seeds are hashed with SHA-512 by CPython, so
they do not depend on ``PYTHONHASHSEED``). One stream per purpose -- ``names``,
``values:<attribute>``, ``bios``, ``heldout-bios``, ``questions:<split>``, ``company-city``,
``company-facts``, ``two-hop``, ``in-context``, ``haystack`` -- so adding an attribute or a
bio does not reshuffle anything else. Derived attributes (``company_city``) are looked up,
never drawn.

Value pools do not depend on the world seed: pool ``a`` of size n is the first n items of
a fixed shuffle of the word-list combinations (so a pool of 100 is a prefix of the pool of
200, and the tokenizer vocabulary is stable across seeds).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

from knowpress.worlds import words
from knowpress.worlds.config import WorldConfig
from knowpress.worlds.items import Passage, Person, QAItem
from knowpress.worlds.passages import fact_sentence, full_passage, lookup_passage
from knowpress.worlds.protocol import world_fingerprint
from knowpress.worlds.templates import COMPANY_TEMPLATES, TEMPLATES, TWO_HOP_TEMPLATES

Split = Literal["trained", "heldout"]
FIRST_BIRTH_YEAR = 1900


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
    if attribute == "company_city":  # companies sit in the same cities people are born in
        return value_pool("birth_city", size)
    if attribute == "pronoun":
        if size > len(words.PRONOUNS):
            raise ValueError(f"pronoun pool has {len(words.PRONOUNS)} values, asked for {size}")
        return list(words.PRONOUNS[:size])
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

    @cached_property
    def names(self) -> frozenset[tuple[str, str, str]]:
        """Every person's ``(first, middle, last)``: the names fictional people must avoid."""
        return frozenset((p.first, p.middle, p.last) for p in self.people)

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

    def bio(self, person: Person, rng: random.Random, full_names: bool | None = None) -> str:
        """One biography: a sentence per attribute (random template), optionally permuted.

        The first sentence names the person; later ones use the pronoun ("She ...") when the
        world has a ``pronoun`` attribute and ``full_names`` (default:
        ``full_name_instead_of_pronoun``) is off.
        """
        chosen = [(a, rng.choice(TEMPLATES[a].bio)) for a in self.config.attributes]
        if self.config.permute_sentences:
            rng.shuffle(chosen)
        pronoun = person.values.get("pronoun")
        if self.config.full_name_instead_of_pronoun if full_names is None else full_names:
            pronoun = None
        sentences = [
            template.format(
                name=person.name if i == 0 or pronoun is None else pronoun.capitalize(),
                value=person.values[a],
            )
            for i, (a, template) in enumerate(chosen)
        ]
        return " ".join(sentences)

    @cached_property
    def company_cities(self) -> dict[str, str]:
        """Headquarters city of every company in the employer pool (``company-city`` stream).

        Drawn per company, in pool order, from the ``company_city`` pool, so it depends only
        on the seed and the pool sizes. Empty when the world has no ``employer``.
        """
        if "employer" not in self.config.attributes:
            return {}
        cities = value_pool("company_city", self.config.pools.company_city)
        rng = self._rng("company-city")
        return {c: cities[rng.randrange(len(cities))] for c in self.value_pool("employer")}

    def add_derived(self, values: dict[str, str]) -> None:
        """Fill ``values``' derived attributes in place: ``company_city`` is the headquarters of
        its ``employer`` (``company_cities``), never an independent draw."""
        if "company_city" in self.config.attributes:
            values["company_city"] = self.company_cities[values["employer"]]

    def companies(self) -> list[str]:
        """Companies that employ somebody in the world, in employer-pool order."""
        used = {p.values["employer"] for p in self.people if "employer" in p.values}
        return [c for c in self.company_cities if c in used]

    def company_facts(self) -> list[tuple[str, str]]:
        """``(company, city)`` for every company whose headquarters is in the training text."""
        if not self.config.company_facts:
            return []
        return [(c, self.company_cities[c]) for c in self.companies()]

    @cached_property
    def _company_sentences(self) -> list[str]:
        rng = self._rng("company-facts")
        return [
            rng.choice(COMPANY_TEMPLATES.bio).format(company=company, value=city)
            for company, city in self.company_facts()
            for _ in range(max(1, self.config.bios_per_person))
        ]

    def training_company_texts(self) -> list[str]:
        """Company sentences (``max(1, bios_per_person)`` per company) and their trained QA."""
        qa = [
            template.format(company=company) + " " + city
            for company, city in self.company_facts()
            for template in self.trained_templates("company")
        ]
        return self._company_sentences + qa

    def two_hop_questions(self) -> list[QAItem]:
        """Person -> employer -> headquarters city, asked in one never-trained question.

        Only people whose employer is a world fact and whose company's city is in the
        training text (``company_facts``); the template comes from the ``two-hop`` stream.
        """
        known = dict(self.company_facts())
        rng = self._rng("two-hop")
        items = []
        for p in self.people:
            company = p.values.get("employer")
            if company is None or company not in known:
                continue
            template = rng.choice(TWO_HOP_TEMPLATES)
            prompt = template.format(name=p.name)
            items.append(QAItem(prompt, known[company], p.name, "company_city"))
        return items

    def training_in_context(self, epoch: int = 0) -> list[Passage]:
        """``in_context_examples`` passages of 1..``in_context_bios`` bios, each followed by
        ``in_context_questions`` questions (stream ``in-context:{epoch}``); a share
        ``in_context_lookup`` of them are lookups instead (``passages.lookup_passage``).

        Every epoch draws fresh fictional people: with a fixed set, a small model memorises
        the passages' answers instead of learning to read them (measured: long_context 0.01
        after 6 epochs over 6000 fixed passages). Several questions per passage multiply the
        reading signal per passage token (passages are most of the training compute).
        """
        rng = self._rng(f"in-context:{epoch}")
        cfg = self.config
        passages = []
        for _ in range(cfg.in_context_examples):
            # Worlds without lookups draw nothing extra, so their passages stay as they were.
            if cfg.in_context_lookup and rng.random() < cfg.in_context_lookup:
                passages.append(lookup_passage(self, rng, rng.randint(2, 2 * cfg.in_context_bios)))
            else:
                n_bios = rng.randint(1, cfg.in_context_bios)
                passages.append(full_passage(self, rng, n_bios, cfg.in_context_questions))
        return passages

    def haystack_items(self, n_bios: int, n_items: int) -> list[QAItem]:
        """``n_items`` prompts of ``n_bios`` fictional bios + one question answered in them.

        Stream ``haystack:{n_bios}`` (never used for training text), so the answer must be
        read from the context rather than recalled.
        """
        if n_bios < 1 or n_items < 0:
            raise ValueError("haystack_items needs n_bios >= 1 and n_items >= 0")
        rng = self._rng(f"haystack:{n_bios}")
        items = []
        for _ in range(n_items):
            passage = full_passage(self, rng, n_bios, 1)
            (q,) = passage.questions
            items.append(QAItem(f"{passage.context} {q.prompt}", q.answer, q.subject, q.attribute,
                                context=passage.context))  # fmt: skip
        return items

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
            for template in self.trained_templates(a)
        ]

    def training_once(self) -> list[str]:
        """Texts shown once per epoch: bios, company facts + their QA."""
        return self.training_bios() + self.training_company_texts()

    def trained_templates(self, attribute: str) -> tuple[str, ...]:
        """The first ``question_templates`` trained phrasings of ``attribute`` (or ``company``)."""
        source = COMPANY_TEMPLATES if attribute == "company" else TEMPLATES[attribute]
        return source.trained[: self.config.question_templates]

    def training_texts(self) -> list[str]:
        """Epoch 0's training text: ``training_once()``, the epoch-0 in-context passages with
        their answers, ``training_qa()`` (later epochs differ only in their passages)."""
        passages = [p.text() for p in self.training_in_context(0)]
        return self.training_once() + passages + self.training_qa()

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
                phrasings = (
                    self.trained_templates(a) if split == "trained" else TEMPLATES[a].heldout
                )
                template = rng.choice(phrasings)
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
        """See :func:`knowpress.worlds.protocol.world_fingerprint`."""
        return world_fingerprint(self)

    def template_words(self) -> list[str]:
        """Every template in this world (bio, trained, held-out), for vocabulary building."""
        out: list[str] = []
        facts = self.config.in_context_style == "facts"  # bios worlds keep their vocabulary
        for a in self.config.attributes:
            t = TEMPLATES[a]
            out.extend([*t.bio, *t.trained, *t.heldout, *([fact_sentence(a)] if facts else [])])
        if "employer" in self.config.attributes:
            c = COMPANY_TEMPLATES
            out.extend([*c.bio, *c.trained, *c.heldout, *TWO_HOP_TEMPLATES])
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
    for attribute in config.drawn_attributes:
        pool = value_pool(attribute, _pool_size_arg(config, attribute))
        rng = _stream(config.seed, f"values:{attribute}")
        values[attribute] = [pool[rng.randrange(len(pool))] for _ in names]
    people = [
        Person(f, m, la, {a: values[a][i] for a in config.attributes if a in values})
        for i, (f, m, la) in enumerate(names)
    ]
    world = World(config, people)
    for p in people:
        world.add_derived(p.values)
    return world
