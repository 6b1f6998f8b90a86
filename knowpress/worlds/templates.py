"""Sentence and question templates, per attribute.

Placeholders: ``{name}`` (the full name) and ``{value}`` (the attribute value). Every bio
sentence names the person, so sentences can be permuted freely (bioS "fullname" variant).

Question templates are split: ``trained`` ones appear in the training text (as
``prompt + " " + answer``; a world uses the first ``WorldConfig.question_templates`` of them,
more phrasings helping held-out generalization); ``heldout`` ones never do, so they measure
whether the knowledge can be extracted with an unseen phrasing. A question's *stem* is its
text before ``{name}``; held-out stems must not occur anywhere in the training text, while
every *word* of a held-out question does occur in it (with 4 trained phrasings): the
teachers use a word-level tokenizer, and a never-trained word is an untrained embedding, so
a question built on one would measure that embedding rather than knowledge extraction
(tests check both).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributeTemplates:
    """All phrasings of one attribute."""

    bio: tuple[str, ...]
    trained: tuple[str, ...]
    heldout: tuple[str, ...]
    # The one fixed sentence of ``in_context_style: facts`` passages (RULER-style needles);
    # every person attribute has one (tested), company facts never appear in passages.
    fact: str | None = None


TEMPLATES: dict[str, AttributeTemplates] = {
    "birth_date": AttributeTemplates(
        bio=(
            "{name} was born on {value}.",
            "{name} came into this world on {value}.",
            "{name} entered the world on {value}.",
            "{name} first saw the light of day on {value}.",
            "{name} celebrates a birthday on {value}.",
        ),
        trained=(
            "Q: When was {name} born? A:",
            "Q: What is the date of birth of {name}? A:",
            "Q: On which day was {name} born? A:",
            "Q: Tell me the birthday of {name}. A:",
        ),
        heldout=(
            "Q: What is the birth date of {name}? A:",
            "Q: Which date was {name} born on? A:",
        ),
        fact="The date of birth of {name} is {value}.",
    ),
    "birth_city": AttributeTemplates(
        bio=(
            "{name} was born in {value}.",
            "{name} spent the early years in {value}.",
            "{name} grew up in {value}.",
            "{name} is a native of {value}.",
            "{name} hails from {value}.",
        ),
        trained=(
            "Q: Where was {name} born? A:",
            "Q: Which city was {name} born in? A:",
            "Q: What is the birthplace of {name}? A:",
            "Q: Name the city where {name} was born. A:",
        ),
        heldout=(
            "Q: Which city is the birthplace of {name}? A:",
            "Q: What city is {name} a native of? A:",
        ),
        fact="The birth city of {name} is {value}.",
    ),
    "university": AttributeTemplates(
        bio=(
            "{name} studied at {value}.",
            "{name} graduated from {value}.",
            "{name} received an education at {value}.",
            "{name} attended {value}.",
            "{name} completed a degree at {value}.",
        ),
        trained=(
            "Q: Which university did {name} study at? A:",
            "Q: What university did {name} graduate from? A:",
            "Q: Name the university of {name}. A:",
            "Q: At which university was {name} educated? A:",
        ),
        heldout=(
            "Q: At which university did {name} study? A:",
            "Q: Which university educated {name}? A:",
        ),
        fact="The university of {name} is {value}.",
    ),
    "major": AttributeTemplates(
        bio=(
            "{name} majored in {value}.",
            "{name} studied the field of {value}.",
            "{name} specialized in {value}.",
            "{name} earned a degree in {value}.",
            "{name} focused on {value} at university.",
        ),
        trained=(
            "Q: What did {name} major in? A:",
            "Q: What did {name} study at university? A:",
            "Q: What was the major of {name}? A:",
            "Q: Name the major of {name}. A:",
        ),
        heldout=(
            "Q: What was the field of study of {name}? A:",
            "Q: Which field did {name} study? A:",
        ),
        fact="The major of {name} is {value}.",
    ),
    "employer": AttributeTemplates(
        bio=(
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "{name} has a job at {value}.",
            "{name} earns a living at {value}.",
            "{name} is on the staff of {value}.",
        ),
        trained=(
            "Q: Which company does {name} work for? A:",
            "Q: Which company employs {name}? A:",
            "Q: What is the employer of {name}? A:",
            "Q: Name the company {name} works for. A:",
        ),
        heldout=(
            "Q: Which company is {name} employed by? A:",
            "Q: Where does {name} work? A:",
        ),
        fact="The employer of {name} is {value}.",
    ),
    "pronoun": AttributeTemplates(
        bio=(
            "{name} uses the pronoun {value}.",
            "{name} goes by the pronoun {value}.",
            "{name} is referred to as {value}.",
        ),
        trained=(
            "Q: Which pronoun does {name} use? A:",
            "Q: What pronoun is used for {name}? A:",
        ),
        heldout=("Q: What pronoun does {name} use? A:",),
        fact="The pronoun of {name} is {value}.",
    ),
    # Derived from employer: the city of the person's company.
    "company_city": AttributeTemplates(
        bio=(
            "{name} works in an office in {value}.",
            "{name} commutes to work in {value}.",
            "{name} has a workplace in {value}.",
        ),
        trained=(
            "Q: In which city does {name} work? A:",
            "Q: Which city does {name} work in? A:",
        ),
        heldout=("Q: What city is the workplace of {name} in? A:",),
        fact="The work city of {name} is {value}.",
    ),
}

# Company facts (the second hop): ``{company}`` is an employer, ``{value}`` its city.
COMPANY_TEMPLATES = AttributeTemplates(
    bio=(
        "{company} is headquartered in {value}.",
        "{company} has its headquarters in {value}.",
        "{company} is based in {value}.",
    ),
    trained=(
        "Q: Where is {company} headquartered? A:",
        "Q: Which city is {company} based in? A:",
    ),
    heldout=("Q: What city is {company} headquartered in? A:",),
)

# 2-hop questions: person -> employer -> headquarters city. Never in the training text.
TWO_HOP_TEMPLATES: tuple[str, ...] = (
    "Q: Which city is the employer of {name} based in? A:",
    "Q: Where is the employer of {name} headquartered? A:",
)


def stem(template: str) -> str:
    """Fixed text before ``{name}``: ``"Q: Where was {name} born? A:"`` -> ``"Q: Where was"``."""
    return template.split("{name}", 1)[0].strip()


def fragments(template: str) -> list[str]:
    """The fixed text pieces of a template, placeholders removed (for vocabulary building)."""
    text = template.replace("{name}", "\0").replace("{value}", "\0").replace("{company}", "\0")
    return [piece for piece in text.split("\0") if piece.strip()]
