"""A small, typed registry: one per method family (stages, quantizers, eval tasks, presets).

Adding a method is: its file, one ``@REGISTRY.register("name")`` decorator, one import line in
the family's ``__init__`` and one row in the family's test matrix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from knowpress.core.errors import KnowpressError, short

T = TypeVar("T")


def close_matches(word: str, choices: list[str], n: int = 3) -> list[str]:
    """Closest names to ``word`` (case-insensitive), best first."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def unknown_name_message(family: str, name: str, choices: list[str]) -> str:
    """``unknown quant method 'rtm'; did you mean 'rtn'? (valid: gptq, rtn)``."""
    hint = close_matches(name[:100], choices)
    did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
    valid = ", ".join(sorted(choices)) or "none registered"
    return f"unknown {family} {short(name, 60)!r}{did_you_mean} (valid: {valid})"


class Registry(Generic[T]):
    """Name -> object map for one family; duplicate names and unknown lookups are errors."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KnowpressError(unknown_name_message(self.family, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        yield from sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
