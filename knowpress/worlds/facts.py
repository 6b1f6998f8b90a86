"""Real-fact worlds: subject-relation-object triples from a JSONL file or from LRE.

File format (``docs/facts-format.md``): one JSON object per line, blank lines ignored::

    {"type": "relation", "name": "capital_of",
     "train_templates": ["The capital of {subject} is"],
     "heldout_templates": ["{subject}'s capital city is"],
     "train_questions": ["Q: What is the capital of {subject}? A:"],   # optional
     "heldout_questions": ["Q: Which city is the capital of {subject}? A:"],  # optional
     "phrase": "the capital of {subject}",                              # optional
     "subject_type": "country", "object_type": "city"}                  # optional
    {"type": "fact", "subject": "France", "relation": "capital_of", "object": "Paris"}

Every template holds ``{subject}`` exactly once; the object is the answer / completion.
Rendering uses ``str.replace`` (never ``str.format``), so subjects may contain braces.

Texts of a world (all deterministic given the config; randomness from
``random.Random(f"knowpress-facts:{seed}:{stream}")``):

- ``training_bios()``: one text per subject (first-appearance order): a sentence
  ``template(subject) + " " + object + "."`` per fact, template drawn per fact, sentences
  shuffled (the bioS analogue).
- ``training_qa()``: ``prompt + " " + answer`` for every fact x trained question template.
  Trained question templates = ``train_questions``, or ``train_templates`` when absent, so
  a trained question is verbatim training text (as in the synthetic world).
- ``questions("heldout")``: ``heldout_questions`` or else ``heldout_templates``; loading
  fails if a rendered held-out prompt occurs inside the same subject's training text.
- ``heldout_texts()``: per-subject texts like the bios but with the held-out templates.
- ``two_hop_questions()``: for facts ``(s, r1, m)`` and ``(m, r2, o)`` where ``r1`` has a
  ``phrase`` (and, when both are declared, ``r1.object_type == r2.subject_type``): the first
  trained question template of ``r2`` (one not starting with ``{subject}`` preferred) with
  ``{subject}`` replaced by ``r1``'s phrase for ``s``; answer ``o``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowpress.core.errors import KnowpressError
from knowpress.worlds import lre
from knowpress.worlds.config import canonical_hash
from knowpress.worlds.facts_format import (
    FACTS_VERSION,
    PLACEHOLDER,
    Fact,
    Record,
    Relation,
    Split,
    TwoHopItem,
    parse_records,
    read_jsonl,
    render,
)
from knowpress.worlds.generator import Passage, QAItem
from knowpress.worlds.protocol import world_fingerprint


class FactsWorldConfig(BaseModel):
    """A real-fact world: exactly one of ``path`` (facts JSONL) or ``lre`` (relation names,
    ``"default"`` or ``"all"``; data from ``lre_dir`` / ``$KNOWPRESS_LRE_DIR`` / the packaged
    copy).

    ``max_facts_per_relation`` keeps a seeded sample (in file order) of each relation.
    ``key()`` = ``canonical_hash`` of the version, the fields that shape the world and the
    sha256 of the data; the locations (``path``, ``lre_dir``) are left out so the same file
    in another checkout gives the same key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["facts"] = "facts"
    path: str | None = None
    lre: tuple[str, ...] | Literal["default", "all"] | None = None
    lre_dir: str | None = None
    seed: int = 0
    max_facts_per_relation: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> FactsWorldConfig:
        if (self.path is None) == (self.lre is None):
            raise ValueError("give exactly one of 'path' (a facts JSONL file) or 'lre'")
        if self.lre_dir is not None and self.lre is None:
            raise ValueError("'lre_dir' only applies with 'lre'")
        return self

    def _source(self) -> tuple[list[Record], str]:
        """(records, sha256 of the data) for this config."""
        if self.path is not None:
            path = Path(self.path).expanduser()
            records = read_jsonl(path)
            return records, hashlib.sha256(path.read_bytes()).hexdigest()
        root = lre.lre_root(self.lre_dir)
        names = lre.resolve_relations(root, self.lre or "default")
        return lre.lre_records(root, names), lre.lre_digest(root, names)

    def key(self) -> str:
        """Short stable hash naming this world (see class doc)."""
        _, digest = self._source()
        fields = self.model_dump(mode="json", exclude={"path", "lre_dir"})
        return canonical_hash({"facts_version": FACTS_VERSION, **fields, "content": digest})

    @property
    def attributes(self) -> tuple[str, ...]:
        """Relation names of the world (builds it, cached), as ``WorldConfig.attributes``."""
        return build_facts_world(self).relations


class FactsWorld:
    """Facts plus every text and question rendered from them (see module doc)."""

    def __init__(
        self, config: FactsWorldConfig, relations: dict[str, Relation], facts: list[Fact]
    ) -> None:
        self.config = config
        self._relations = relations
        self._facts = facts
        used = {f.relation for f in facts}
        self.relations: tuple[str, ...] = tuple(r for r in relations if r in used)
        self._by_subject: dict[str, list[Fact]] = {}
        for fact in facts:
            self._by_subject.setdefault(fact.subject, []).append(fact)
        self._bios = self._render_texts("bios", "train_templates", len(self._by_subject))
        self._check_heldout_unseen()

    def __repr__(self) -> str:
        return f"FactsWorld(relations={len(self.relations)}, facts={len(self._facts)})"

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"knowpress-facts:{self.config.seed}:{stream}")

    def relation(self, name: str) -> Relation:
        return self._relations[name]

    def facts(self) -> list[tuple[str, str, str]]:
        """``(subject, relation, object)`` in file order."""
        return [(f.subject, f.relation, f.object) for f in self._facts]

    def value_pool(self, attribute: str) -> list[str]:
        """Sorted distinct objects of relation ``attribute`` (|S_a|)."""
        if attribute not in self.relations:
            raise ValueError(f"relation {attribute!r} is not in this world")
        return sorted({f.object for f in self._facts if f.relation == attribute})

    def _render_texts(self, stream: str, field: str, count: int) -> list[str]:
        """``count`` per-subject texts (cycling over subjects), one sentence per fact."""
        rng, subjects = self._rng(stream), list(self._by_subject)
        out = []
        for i in range(count):
            subject = subjects[i % len(subjects)]
            sentences = [
                f"{render(rng.choice(getattr(self._relations[f.relation], field)), subject)}"
                f" {f.object}."
                for f in self._by_subject[subject]
            ]
            rng.shuffle(sentences)
            out.append(" ".join(sentences))
        return out

    def training_bios(self) -> list[str]:
        """One text per subject, every fact as a sentence from a training template."""
        return list(self._bios)

    def training_qa(self) -> list[str]:
        """``prompt + " " + answer`` for every fact x trained question template."""
        return [
            f"{render(t, f.subject)} {f.object}"
            for f in self._facts
            for t in self._relations[f.relation].train_questions
        ]

    def training_once(self) -> list[str]:
        """Texts a teacher epoch shows once (the bios); QA strings are repeated by the trainer."""
        return self.training_bios()

    def training_in_context(self, epoch: int = 0) -> list[Passage]:
        """No in-context passages in a facts world (long_context needs a bioS world)."""
        return []

    def training_texts(self) -> list[str]:
        """Everything the teacher trains on: ``training_once() + training_qa()``."""
        return self.training_once() + self.training_qa()

    def questions(self, split: Split) -> list[QAItem]:
        """One item per fact, template drawn from the ``questions:<split>`` stream."""
        if split not in ("trained", "heldout"):
            raise ValueError(f"split must be 'trained' or 'heldout', not {split!r}")
        field = "train_questions" if split == "trained" else "heldout_questions"
        rng = self._rng(f"questions:{split}")
        return [
            QAItem(render(rng.choice(getattr(self._relations[f.relation], field)), f.subject),
                   f.object, f.subject, f.relation)
            for f in self._facts
        ]  # fmt: skip

    def heldout_texts(self, n: int | None = None) -> list[str]:
        """``n`` texts (default one per subject, cycling) from the held-out templates."""
        count = len(self._by_subject) if n is None else n
        return self._render_texts("heldout-bios", "heldout_templates", count)

    def two_hop_questions(self) -> list[TwoHopItem]:
        """Every chain ``(s, r1, m), (m, r2, o)`` with a ``phrase`` for ``r1``, in fact order."""
        items = []
        for first in self._facts:
            phrase = self._relations[first.relation].phrase
            if phrase is None:
                continue
            for second in self._by_subject.get(first.object, []):
                if not self._types_chain(first.relation, second.relation):
                    continue
                bridge = render(phrase, first.subject)
                templates = self._relations[second.relation].train_questions
                inside = [t for t in templates if not t.startswith(PLACEHOLDER)]
                template = (inside or templates)[0]
                if template.startswith(PLACEHOLDER):
                    bridge = bridge[:1].upper() + bridge[1:]
                items.append(
                    TwoHopItem(
                        render(template, bridge), second.object, first.subject,
                        f"{first.relation}>{second.relation}", first.object,
                        first.relation, second.relation,
                    )
                )  # fmt: skip
        return items

    def _types_chain(self, first: str, second: str) -> bool:
        """Whether r1's objects can be r2's subjects: types equal, or either one unknown."""
        a, b = self._relations[first].object_type, self._relations[second].subject_type
        return a is None or b is None or a == b

    def template_words(self) -> list[str]:
        """Every template and phrase (``{subject}`` written as ``{name}``) for the tokenizer,
        plus the rendered held-out and 2-hop prompts: a subject ending in punctuation
        ("Warner Bros.") fuses with the template's ("?") into a word-level token (".?") that
        no template or training text contains.
        """
        out = [q.prompt for q in self.questions("heldout")]
        out += [q.prompt for q in self.two_hop_questions()]
        for r in self._relations.values():
            for t in (*r.train_templates, *r.heldout_templates, *r.train_questions,
                      *r.heldout_questions, *([r.phrase] if r.phrase else [])):  # fmt: skip
                out.append(t.replace(PLACEHOLDER, "{name}"))
        return out

    def fingerprint(self) -> str:
        """See :func:`knowpress.worlds.protocol.world_fingerprint`."""
        return world_fingerprint(self)

    def _check_heldout_unseen(self) -> None:
        """A held-out prompt inside its subject's training text would not be held out."""
        texts = {s: " ".join([self._bios[i]] + [f"{render(t, s)} {f.object}" for f in fs
                 for t in self._relations[f.relation].train_questions])
                 for i, (s, fs) in enumerate(self._by_subject.items())}  # fmt: skip
        for f in self._facts:
            relation = self._relations[f.relation]
            for template in relation.heldout_questions:
                if render(template, f.subject) in texts[f.subject]:
                    raise KnowpressError(
                        f"{relation.where}: held-out question {template!r} occurs in the "
                        f"training text of {f.subject!r}; rephrase it unlike every training one"
                    )


_CACHE: dict[tuple[str, str], FactsWorld] = {}


def build_facts_world(config: FactsWorldConfig) -> FactsWorld:
    """The world for ``config``; the same config and data give the same world in any process."""
    records, digest = config._source()
    cache_key = (json.dumps(config.model_dump(mode="json"), sort_keys=True), digest)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    relations, located = parse_records(records)
    facts = [fact for _, fact in located]
    if config.max_facts_per_relation is not None:
        keep: set[int] = set()
        for name in relations:
            indices = [i for i, f in enumerate(facts) if f.relation == name]
            rng = random.Random(f"knowpress-facts:{config.seed}:sample:{name}")
            keep.update(rng.sample(indices, min(len(indices), config.max_facts_per_relation)))
        facts = [f for i, f in enumerate(facts) if i in keep]
    world = FactsWorld(config, relations, facts)
    if len(_CACHE) >= 8:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[cache_key] = world
    return world


def load_facts(
    path: str | Path, *, seed: int = 0, max_facts_per_relation: int | None = None
) -> FactsWorld:
    """Load a facts JSONL file (format in the module doc); bad lines raise KnowpressError."""
    config = FactsWorldConfig(
        path=str(path), seed=seed, max_facts_per_relation=max_facts_per_relation
    )
    return build_facts_world(config)
