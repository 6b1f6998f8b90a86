"""World configuration: everything that determines a synthetic fact world.

``WorldConfig`` is frozen and strict (unknown fields are errors), so a world is named by its
config alone: ``cfg.key()`` = first 12 hex digits of
``sha256(canonical_json({"world_version": WORLD_VERSION, **cfg.key_fields()}))`` where
canonical JSON has sorted keys and no whitespace (``key_fields`` leaves out fields added
later while they hold the default that reproduces older worlds). ``WORLD_VERSION`` changes
whenever the generator's output for an unchanged config would change, so caches keyed on it
never serve a stale world.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from knowpress.worlds import words

WORLD_VERSION = 4  # 2: pronoun, company city, in-context QA; 3: fresh passages per epoch;
# 4: full-name passages, several questions per passage

# Attribute name -> how many distinct values the word lists can make (the pool-size ceiling).
SUPPORTED_ATTRIBUTES: dict[str, int] = {
    "birth_date": len(words.MONTHS) * 28 * 1000,  # 12 months x 28 days x years
    "birth_city": len(words.CITY_ROOTS) * len(words.CITY_FORMS),
    "university": len(words.UNIVERSITY_ROOTS) * len(words.UNIVERSITY_FORMS),
    "major": len(words.MAJORS),
    "employer": len(words.EMPLOYER_ROOTS) * len(words.EMPLOYER_SUFFIXES),
    "pronoun": len(words.PRONOUNS),
    # Derived, not drawn: the city of the person's employer (the world's company -> city map).
    "company_city": len(words.CITY_ROOTS) * len(words.CITY_FORMS),
}
# Attributes whose value is a function of another attribute's value (never drawn).
DERIVED_ATTRIBUTES: dict[str, str] = {"company_city": "employer"}


def canonical_hash(payload: Any, length: int = 12) -> str:
    """First ``length`` hex digits of sha256 over sorted-key, compact JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


class PoolSizes(BaseModel):
    """How many distinct values each attribute draws from (Physics of LMs 3.1 defaults).

    ``birth_years`` sets the birth-date pool: 12 months x 28 days x ``birth_years`` years
    starting at 1900, i.e. 67,200 dates by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    birth_city: int = Field(200, ge=1)
    university: int = Field(300, ge=1)
    major: int = Field(100, ge=1)
    employer: int = Field(263, ge=1)
    pronoun: int = Field(2, ge=1)
    company_city: int = Field(200, ge=1)  # cities companies are headquartered in
    birth_years: int = Field(200, ge=1, le=1000)

    def size(self, attribute: str) -> int:
        """|S_a|: the number of distinct values attribute ``attribute`` can take."""
        if attribute == "birth_date":
            return len(words.MONTHS) * 28 * self.birth_years
        return int(getattr(self, attribute))


class WorldConfig(BaseModel):
    """A bioS-style world: ``n_people`` people, each with one value per attribute.

    Training text per person = ``bios_per_person`` biographies (one sentence per attribute,
    template picked at random, sentence order shuffled when ``permute_sentences``) plus one
    QA string per attribute and trained question template (the first ``question_templates``
    of each attribute's trained phrasings). With ``pronoun`` among the
    attributes, bio sentences after the first say "He"/"She" instead of the full name unless
    ``full_name_instead_of_pronoun`` (the bioS "fullname" augmentation).

    With ``employer`` among the attributes, every company has a headquarters city (drawn once
    per company, so ``company_city`` is derived from ``employer``); ``company_facts`` adds
    one sentence and the trained QA per company that employs someone, so 2-hop questions
    (person -> employer -> city) can be answered. ``in_context_examples`` passages of
    1..``in_context_bios`` biographies of *fictional* people (not in the world), each
    followed by ``in_context_questions`` questions about them, teach reading the answer from
    the context; the ``long_context`` haystacks are drawn the same way (one question).
    ``in_context_full_names`` writes those passages in the bioS "fullname" form, so a fact
    is found next to its person's name rather than by tracking whose bio a "She" is in.
    ``in_context_style: facts`` writes them instead as one fixed sentence per person and
    attribute, ``The {relation} of {name} is {value}.``, shuffled across the passage's
    people: RULER's multi-key needles (Hsieh et al. 2024), where the value sits at a fixed
    offset after its key. In ``bios`` passages the relation phrase between name and value
    varies, so reading them takes binding a value to the name at its sentence's start; the
    4-layer small teachers learned that for one bio but not for several (see presets.py).
    ``in_context_lookup`` makes that share of the training passages *lookups*: one attribute
    stated for 2..2*``in_context_bios`` people (one sentence each, in the world's style), then
    questions about it, so the relation cannot pick the answer and only the name can. They
    teach the name half of the (name, relation) lookup that full passages leave unlearned.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_people: int = Field(200, ge=1, le=500_000)
    attributes: tuple[str, ...] = ("birth_date", "birth_city", "university", "major", "employer")
    pools: PoolSizes = PoolSizes()
    bios_per_person: int = Field(1, ge=0)
    permute_sentences: bool = True
    full_name_instead_of_pronoun: bool = False
    company_facts: bool = True
    question_templates: int = Field(1, ge=1)  # trained phrasings used per attribute
    in_context_examples: int = Field(0, ge=0)
    in_context_bios: int = Field(4, ge=1)
    in_context_questions: int = Field(1, ge=1)  # questions after each training passage
    in_context_full_names: bool = True  # passage bios name the person in every sentence
    in_context_style: Literal["bios", "facts"] = "bios"
    in_context_lookup: float = Field(0.0, ge=0, le=1)  # share of lookup passages (see above)

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one attribute is required")
        unknown = [a for a in value if a not in SUPPORTED_ATTRIBUTES]
        if unknown:
            valid = ", ".join(SUPPORTED_ATTRIBUTES)
            raise ValueError(f"unknown attribute(s) {', '.join(unknown)} (valid: {valid})")
        if len(set(value)) != len(value):
            raise ValueError("attributes must not repeat")
        for derived, source in DERIVED_ATTRIBUTES.items():
            if derived in value and source not in value:
                raise ValueError(f"attribute {derived} is derived from {source}; add {source}")
        return value

    @model_validator(mode="after")
    def _pools_fit_word_lists(self) -> WorldConfig:
        for attribute in self.attributes:
            size, ceiling = self.pools.size(attribute), SUPPORTED_ATTRIBUTES[attribute]
            if size > ceiling:
                raise ValueError(f"pools.{attribute}={size} exceeds the {ceiling} values available")
        return self

    @property
    def drawn_attributes(self) -> tuple[str, ...]:
        """The attributes drawn per person; derived ones (``DERIVED_ATTRIBUTES``) are looked up."""
        return tuple(a for a in self.attributes if a not in DERIVED_ATTRIBUTES)

    def key_fields(self) -> dict[str, Any]:
        """The config as hashed: ``model_dump`` less fields added later while at their
        default (``_LATER_DEFAULTS``), so worlds made before a field existed keep their key."""
        dump = self.model_dump(mode="json")
        for name, default in _LATER_DEFAULTS.items():
            if dump[name] == default:
                del dump[name]
        return dump

    def key(self) -> str:
        """Short stable hash of this config (and the generator version); see module doc."""
        return canonical_hash({"world_version": WORLD_VERSION, **self.key_fields()})


# Fields added after WORLD_VERSION 4, with the default that reproduces the older worlds.
_LATER_DEFAULTS: dict[str, Any] = {"in_context_style": "bios", "in_context_lookup": 0.0}
