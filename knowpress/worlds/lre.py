"""Real facts from the LRE relations data set, as facts-format records.

Source: Hernandez et al., "Linearity of Relation Decoding in Transformer Language Models",
``relations`` data set (MIT licence; the LICENSE file travels with the data directory). The
47 relation files (1.2 MB) ship inside the package, ``knowpress/worlds/data/lre/`` with its
LICENSE (``pyproject.toml``'s package-data), so a clone or a wheel needs nothing beside it.
Layout: ``<root>/data/<group>/<relation>.json`` with ``name``, ``prompt_templates``
(``{}`` = the subject), ``prompt_templates_zs``, ``properties`` and
``samples: [{"subject", "object"}, ...]``. A relation is named by its file stem
(``country_capital_city``), not by its ``name`` field (which has spaces).

Conversion (``lre_records``), each step deterministic:

- ``prompt_templates`` -> ``train_templates``; ``prompt_templates_zs`` -> ``heldout_templates``
  minus any that is a training template or whose rendering occurs inside one (e.g. the data
  repeats ``"{} speaks the language of"`` in both lists). A relation left with no held-out
  template (``presidents_birth_year``, ``presidents_election_year``) cannot be measured on
  paraphrases: naming it is an error and ``"all"`` skips it.
- Subjects listed with two different objects (a few in 11 relations) are dropped: the
  question has no single answer. Repeated identical samples are kept once.
- ``properties.domain_name`` / ``range_name`` -> ``subject_type`` / ``object_type``, so
  2-hop chains only join a relation's objects to subjects of the same type (the data has
  headquarters "cities" that are countries, and companies that are also landmarks).
- ``PHRASES`` (written for knowpress, not part of LRE) gives a noun phrase for the relations
  whose object can be the subject of another relation, so 2-hop questions can be composed.

The root is found by ``lre_root``: an explicit path, else ``$KNOWPRESS_LRE_DIR``, else the
packaged copy (``PACKAGED``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from knowpress.core.errors import KnowpressError

if TYPE_CHECKING:
    from knowpress.worlds.facts import FactsWorld

LRE_ENV = "KNOWPRESS_LRE_DIR"
#: the LRE data shipped with knowpress (LICENSE, README.md, data/<group>/<relation>.json)
PACKAGED = Path(__file__).resolve().parent / "data" / "lre"

# Relations chosen because their facts chain: landmark/food/city -> country -> capital,
# currency, language, largest city; product -> company -> CEO, headquarters city.
DEFAULT_RELATIONS: tuple[str, ...] = (
    "landmark_in_country",
    "food_from_country",
    "city_in_country",
    "country_capital_city",
    "country_currency",
    "country_language",
    "country_largest_city",
    "product_by_company",
    "company_ceo",
    "company_hq",
)

# Noun phrase naming the object of a relation, used as the bridge of 2-hop questions:
# "The capital city of {the country where X is located} is".
PHRASES: dict[str, str] = {
    "landmark_in_country": "the country where {subject} is located",
    "food_from_country": "the country {subject} comes from",
    "city_in_country": "the country {subject} is in",
    "country_capital_city": "the capital city of {subject}",
    "country_largest_city": "the largest city in {subject}",
    "product_by_company": "the company that created {subject}",
    "company_hq": "the city where {subject} is headquartered",
    "company_ceo": "the CEO of {subject}",
}


def lre_root(root: str | Path | None = None) -> Path:
    """The LRE directory: ``root``, else ``$KNOWPRESS_LRE_DIR``, else the packaged copy.

    Raises KnowpressError naming the path tried and how to point at the data.
    """
    if root is not None:
        path, how = Path(root).expanduser(), "the given lre_dir"
    elif os.environ.get(LRE_ENV):
        path, how = Path(os.environ[LRE_ENV]).expanduser(), f"${LRE_ENV}"
    else:
        path, how = PACKAGED, "the copy packaged with knowpress: a broken install, reinstall it"
    if not (path / "data").is_dir():
        raise KnowpressError(
            f"{path}: no LRE data here ({how}; expected {path / 'data'}/<group>/<relation>.json); "
            f"set lre_dir or ${LRE_ENV} to the directory holding LICENSE and data/"
        )
    return path


def relation_files(root: Path) -> dict[str, Path]:
    """Relation name (file stem) -> JSON file, for every relation under ``root/data``."""
    return {p.stem: p for p in sorted((root / "data").glob("*/*.json"))}


def _render(template: str) -> str:
    return template.replace("{subject}", "\0")


def _convert_templates(raw: list[str]) -> list[str]:
    return [t.replace("{}", "{subject}").strip() for t in raw]


def _heldout(train: list[str], zero_shot: list[str]) -> list[str]:
    """Held-out templates that are neither training templates nor contained in one."""
    rendered = [_render(t) for t in train]
    return [z for z in zero_shot if not any(_render(z) in r for r in rendered)]


def usable(root: Path, name: str) -> bool:
    """Whether relation ``name`` keeps at least one held-out template after filtering."""
    data = json.loads(relation_files(root)[name].read_text(encoding="utf-8"))
    train = _convert_templates(data["prompt_templates"])
    return bool(_heldout(train, _convert_templates(data["prompt_templates_zs"])))


def resolve_relations(root: Path, relations: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"default"``: DEFAULT_RELATIONS; ``"all"``: every usable relation; else checked names."""
    files = relation_files(root)
    if relations == "all":
        return tuple(name for name in files if usable(root, name))
    names = DEFAULT_RELATIONS if relations == "default" else tuple(relations)
    unknown = [n for n in names if n not in files]
    if unknown:
        raise KnowpressError(
            f"lre: unknown relation(s) {', '.join(unknown)} in {root / 'data'}; "
            f"use file stems such as {', '.join(list(files)[:4])}, or 'default' / 'all'"
        )
    unusable = [n for n in names if not usable(root, n)]
    if unusable:
        raise KnowpressError(
            f"lre: relation(s) {', '.join(unusable)} have no held-out template that differs from "
            "the training ones; remove them from lre"
        )
    if len(set(names)) != len(names):
        raise KnowpressError("lre: a relation is listed twice; list each once")
    return names


def lre_records(root: Path, names: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Facts-format records ``(where, record)`` for relations ``names`` (see module doc)."""
    files = relation_files(root)
    records: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        path = files[name]
        data = json.loads(path.read_text(encoding="utf-8"))
        train = _convert_templates(data["prompt_templates"])
        relation: dict[str, Any] = {
            "type": "relation",
            "name": name,
            "train_templates": train,
            "heldout_templates": _heldout(train, _convert_templates(data["prompt_templates_zs"])),
        }
        if name in PHRASES:
            relation["phrase"] = PHRASES[name]
        properties = data.get("properties", {})
        for key, field in (("domain_name", "subject_type"), ("range_name", "object_type")):
            if isinstance(properties.get(key), str) and properties[key].strip():
                relation[field] = properties[key].strip()
        records.append((str(path), relation))
        objects: dict[str, set[str]] = {}
        for sample in data["samples"]:
            objects.setdefault(sample["subject"].strip(), set()).add(sample["object"].strip())
        seen: set[str] = set()
        for i, sample in enumerate(data["samples"]):
            subject = sample["subject"].strip()
            if len(objects[subject]) != 1 or subject in seen:
                continue
            seen.add(subject)
            fact = {"subject": subject, "relation": name, "object": sample["object"].strip()}
            records.append((f"{path} (sample {i})", {"type": "fact", **fact}))
    return records


def lre_digest(root: Path, names: tuple[str, ...]) -> str:
    """sha256 of the relation files used (name + bytes) and the phrase table."""
    digest = hashlib.sha256()
    files = relation_files(root)
    for name in names:
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    digest.update(json.dumps(PHRASES, sort_keys=True).encode())
    return digest.hexdigest()


def load_lre(
    root: str | Path | None = None,
    relations: tuple[str, ...] | list[str] | Literal["default", "all"] = "default",
    *,
    seed: int = 0,
    max_facts_per_relation: int | None = None,
) -> FactsWorld:
    """A facts world from the LRE data; ``root`` None: ``$KNOWPRESS_LRE_DIR`` or the packaged
    copy."""
    from knowpress.worlds.facts import FactsWorldConfig, build_facts_world  # facts imports us

    names = relations if isinstance(relations, str) else tuple(relations)
    config = FactsWorldConfig(
        lre=names,
        lre_dir=None if root is None else str(root),
        seed=seed,
        max_facts_per_relation=max_facts_per_relation,
    )
    return build_facts_world(config)
