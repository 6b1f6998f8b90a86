"""The facts JSONL format: parse relation and fact lines, collecting every problem.

See ``docs/facts-format.md`` and the ``knowpress.worlds.facts`` module docstring for the
format. Each problem is one ``file:line: problem; fix`` line; up to 20 are reported at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from knowpress.core.errors import KnowpressError
from knowpress.worlds.generator import QAItem

# Bump when the same file would render to different texts/questions (cached teachers go stale).
FACTS_VERSION = 1
PLACEHOLDER = "{subject}"
Split = Literal["trained", "heldout"]
Record = tuple[str, Any]  # (where: "file:line", parsed JSON value)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RELATION_KEYS = {
    "type", "name", "train_templates", "heldout_templates", "train_questions",
    "heldout_questions", "phrase", "subject_type", "object_type", "description",
}  # fmt: skip
_FACT_KEYS = {"type", "subject", "relation", "object"}
_MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Relation:
    """A declared relation; question lists are already defaulted to the templates."""

    name: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    train_questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    phrase: str | None
    subject_type: str | None
    object_type: str | None
    where: str


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class TwoHopItem(QAItem):
    """A composed question: ``subject`` -(first)-> ``bridge`` -(second)-> ``answer``.

    ``attribute`` is ``"first>second"`` so per-attribute reporting keeps chains apart.
    """

    bridge: str
    first: str
    second: str


def render(template: str, subject: str) -> str:
    return template.replace(PLACEHOLDER, subject)


class _Problems(list[str]):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}")


def _strings(problems: _Problems, where: str, record: dict[str, Any], key: str) -> tuple[str, ...]:
    """``record[key]`` as a tuple of templates; records a problem and returns () when bad."""
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.add(where, f"'{key}' must be a non-empty list of strings; fix its value")
        return ()
    out = tuple(v.strip() for v in value)
    for template in out:
        if template.count(PLACEHOLDER) != 1:
            problems.add(
                where,
                f"template {template!r} in '{key}' must contain {PLACEHOLDER} exactly once; "
                f"put {PLACEHOLDER} where the subject goes",
            )
    return out


def _parse_relation(problems: _Problems, where: str, rec: dict[str, Any]) -> Relation | None:
    before = len(problems)
    name = rec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.add(where, "relation 'name' must match [A-Za-z][A-Za-z0-9_]*; fix the name")
    train = _strings(problems, where, rec, "train_templates")
    heldout = _strings(problems, where, rec, "heldout_templates")
    train_q = (
        _strings(problems, where, rec, "train_questions") if "train_questions" in rec else train
    )
    heldout_q = (
        _strings(problems, where, rec, "heldout_questions")
        if "heldout_questions" in rec
        else heldout
    )
    phrase = rec.get("phrase")
    if phrase is not None and (not isinstance(phrase, str) or phrase.count(PLACEHOLDER) != 1):
        problems.add(where, f"'phrase' must be a string containing {PLACEHOLDER} exactly once")
    types = [rec.get("subject_type"), rec.get("object_type")]
    if any(t is not None and (not isinstance(t, str) or not t.strip()) for t in types):
        problems.add(where, "'subject_type' and 'object_type' must be non-empty strings when given")
    for template in heldout + heldout_q:
        if template in train + train_q:
            problems.add(
                where, f"held-out template {template!r} is also a training one; rephrase or drop it"
            )
    if len(problems) > before:
        return None
    return Relation(str(name), train, heldout, train_q, heldout_q, phrase, *types, where)


def _parse_fact(problems: _Problems, where: str, rec: dict[str, Any]) -> Fact | None:
    fields: list[str] = []
    for key in ("subject", "relation", "object"):
        value = rec.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "is missing" if key not in rec else "must be a non-empty string"
            problems.add(where, f"fact '{key}' {what}; a fact needs subject, relation and object")
            return None
        fields.append(value.strip())
    return Fact(*fields)


def parse_records(records: Iterable[Record]) -> tuple[dict[str, Relation], list[tuple[str, Fact]]]:
    """Validate records -> (relations by name, ``(where, fact)`` in order, duplicates dropped).

    Relation lines may come before or after their facts. All problems (up to 20) are
    raised together as one KnowpressError, one ``where: problem; fix`` line each.
    """
    problems = _Problems()
    relations: dict[str, Relation] = {}
    raw_facts: list[tuple[str, Fact]] = []
    broken: set[str] = set()
    for where, rec in records:
        if not isinstance(rec, dict):
            problems.add(where, "expected a JSON object; write one object per line")
            continue
        kind = rec.get("type")
        allowed = _RELATION_KEYS if kind == "relation" else _FACT_KEYS
        if kind not in ("relation", "fact"):
            problems.add(where, '\'type\' must be "relation" or "fact"; add or fix it')
            continue
        unknown = sorted(set(rec) - allowed)
        if unknown:
            keys = ", ".join(sorted(allowed))
            problems.add(
                where, f"unknown key(s) {', '.join(unknown)} in a {kind} line (allowed: {keys})"
            )
            continue
        if kind == "relation":
            relation = _parse_relation(problems, where, rec)
            if relation is None:
                broken.add(str(rec.get("name")))  # its facts would only repeat the problem
                continue
            if relation.name in relations:
                first = relations[relation.name].where
                problems.add(
                    where, f"relation '{relation.name}' is already declared at {first}; keep one"
                )
                continue
            relations[relation.name] = relation
        elif (fact := _parse_fact(problems, where, rec)) is not None:
            raw_facts.append((where, fact))
    facts: list[tuple[str, Fact]] = []
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for where, fact in raw_facts:
        if fact.relation in broken:
            continue
        if fact.relation not in relations:
            declared = ", ".join(relations) or "none"
            problems.add(
                where,
                f"unknown relation '{fact.relation}' (declared: {declared}); "
                'declare it with a {"type": "relation", ...} line',
            )
            continue
        key = (fact.subject, fact.relation)
        if key in seen:
            first_where, first_object = seen[key]
            if first_object != fact.object:
                problems.add(
                    where,
                    f"({fact.subject}, {fact.relation}) -> {fact.object!r} conflicts with "
                    f"{first_object!r} at {first_where}; keep one object per subject and relation",
                )
            continue
        seen[key] = (where, fact.object)
        facts.append((where, fact))
    used = {fact.relation for _, fact in facts}
    for name, relation in relations.items():
        if name not in used and not problems:
            problems.add(relation.where, f"relation '{name}' has no facts; add facts or remove it")
    if problems:
        extra = len(problems) - _MAX_PROBLEMS
        lines = problems[:_MAX_PROBLEMS] + ([f"... and {extra} more"] if extra > 0 else [])
        raise KnowpressError("\n".join(lines))
    return relations, facts


def read_jsonl(path: Path) -> list[Record]:
    """``(f"{path}:{line}", value)`` per non-blank line; bad JSON raises KnowpressError."""
    if not path.is_file():
        raise KnowpressError(f"{path}: facts file not found; fix the path (a JSONL file)")
    records: list[Record] = []
    problems = _Problems()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                problems.add(
                    f"{path}:{number}",
                    f"not valid JSON ({err.msg}, column {err.pos + 1}); write one object per line",
                )
    if problems:
        raise KnowpressError("\n".join(problems[:_MAX_PROBLEMS]))
    return records
