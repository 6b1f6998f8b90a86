"""Sentence and question templates, per attribute.

Placeholders: ``{name}`` (the full name) and ``{value}`` (the attribute value). Every bio
sentence names the person, so sentences can be permuted freely (bioS "fullname" variant).

Question templates are split: ``trained`` ones appear in the training text (as
``prompt + " " + answer``); ``heldout`` ones never do, so they measure whether the knowledge
can be extracted with an unseen phrasing. A question's *stem* is its text before ``{name}``;
held-out stems must not occur anywhere in the training text (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributeTemplates:
    """All phrasings of one attribute."""

    bio: tuple[str, ...]
    trained: tuple[str, ...]
    heldout: tuple[str, ...]


TEMPLATES: dict[str, AttributeTemplates] = {
    "birth_date": AttributeTemplates(
        bio=(
            "{name} was born on {value}.",
            "{name} came into this world on {value}.",
            "{name} entered the world on {value}.",
            "{name} first saw the light of day on {value}.",
            "{name} celebrates a birthday on {value}.",
        ),
        trained=("Q: When was {name} born? A:",),
        heldout=(
            "Q: What is the birth date of {name}? A:",
            "Q: On what date was {name} born? A:",
        ),
    ),
    "birth_city": AttributeTemplates(
        bio=(
            "{name} was born in {value}.",
            "{name} spent the early years in {value}.",
            "{name} grew up in {value}.",
            "{name} is a native of {value}.",
            "{name} hails from {value}.",
        ),
        trained=("Q: Where was {name} born? A:",),
        heldout=(
            "Q: In which city was {name} born? A:",
            "Q: What is the hometown of {name}? A:",
        ),
    ),
    "university": AttributeTemplates(
        bio=(
            "{name} studied at {value}.",
            "{name} graduated from {value}.",
            "{name} received an education at {value}.",
            "{name} attended {value}.",
            "{name} completed a degree at {value}.",
        ),
        trained=("Q: Which university did {name} study at? A:",),
        heldout=(
            "Q: Where did {name} go to college? A:",
            "Q: What school did {name} graduate from? A:",
        ),
    ),
    "major": AttributeTemplates(
        bio=(
            "{name} majored in {value}.",
            "{name} studied the field of {value}.",
            "{name} specialized in {value}.",
            "{name} earned a degree in {value}.",
            "{name} focused on {value} at university.",
        ),
        trained=("Q: What did {name} major in? A:",),
        heldout=(
            "Q: What was the field of study of {name}? A:",
            "Q: Which subject did {name} specialize in? A:",
        ),
    ),
    "employer": AttributeTemplates(
        bio=(
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "{name} has a job at {value}.",
            "{name} earns a living at {value}.",
            "{name} is on the staff of {value}.",
        ),
        trained=("Q: Which company does {name} work for? A:",),
        heldout=(
            "Q: Who employs {name}? A:",
            "Q: Where does {name} work? A:",
        ),
    ),
}


def stem(template: str) -> str:
    """Fixed text before ``{name}``: ``"Q: Where was {name} born? A:"`` -> ``"Q: Where was"``."""
    return template.split("{name}", 1)[0].strip()


def fragments(template: str) -> list[str]:
    """The fixed text pieces of a template, placeholders removed (for vocabulary building)."""
    text = template.replace("{name}", "\0").replace("{value}", "\0")
    return [piece for piece in text.split("\0") if piece.strip()]
