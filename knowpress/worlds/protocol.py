"""What evaluation needs from a fact world, synthetic (bioS) or real (facts JSONL, LRE).

Tasks only talk to this protocol, so every task scores every world kind.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from knowpress.worlds.generator import Passage, QAItem

Split = Literal["trained", "heldout"]


class WorldConfigLike(Protocol):
    def key(self) -> str: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


class FactWorld(Protocol):
    config: WorldConfigLike

    def facts(self) -> list[tuple[str, str, str]]:
        """(subject, attribute/relation, value) triples the teacher is trained on."""
        ...

    def value_pool(self, attribute: str) -> list[str]:
        """Every value ``attribute`` can take (|S_a| in the bits formula)."""
        ...

    def training_texts(self) -> list[str]: ...

    def training_once(self) -> list[str]:
        """Texts shown once per training epoch (bios, ...)."""
        ...

    def training_qa(self) -> list[str]:
        """Trained ``question + answer`` strings (repeated ``qa_repeat`` times per epoch)."""
        ...

    def training_in_context(self, epoch: int = 0) -> list[Passage]:
        """Epoch ``epoch``'s in-context passages (context + questions; may be empty)."""
        ...

    def questions(self, split: Split) -> list[QAItem]:
        """One item per fact; ``trained`` uses training templates, ``heldout`` unseen ones."""
        ...

    def heldout_texts(self, n: int | None = None) -> list[str]: ...

    def fingerprint(self) -> str: ...


def _record(item: Any) -> dict[str, Any]:
    """An item's fields; an absent ``context`` is left out, so fingerprints recorded before
    ``QAItem.context`` existed still match."""
    return {k: v for k, v in vars(item).items() if not (k == "context" and v is None)}


def world_fingerprint(world: Any) -> str:
    """sha256 hex of the JSON of facts, training texts, both question splits, held-out texts
    and 2-hop items: recorded next to a teacher so ``load_world`` can detect a world that no
    longer regenerates identically (a changed generator or data file)."""
    payload = {
        "facts": world.facts(),
        "train": world.training_texts(),
        "questions": {s: [_record(q) for q in world.questions(s)] for s in ("trained", "heldout")},
        "heldout_texts": world.heldout_texts(),
        "two_hop": [_record(q) for q in world.two_hop_questions()],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
