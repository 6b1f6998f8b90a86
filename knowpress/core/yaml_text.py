"""Recipe YAML: ``yaml.SafeLoader`` plus the checks a CI gate's input needs.

- A key given twice in one mapping is an error naming the key and both lines (YAML itself
  keeps the last, so a second ``gate:`` would silently replace the first). Merge keys
  (``<<: *base``, YAML 1.1) work as in PyYAML: the mapping's own keys override the merged
  ones, which is not a duplicate; a key twice among its own keys still is.
- Aliases may not expand the document past :data:`MAX_VALUES` values, nor nest it past
  :data:`MAX_DEPTH` levels (a 550-byte "billion laughs" recipe otherwise expands to 10^9).
- Only plain data: ``!!python/...`` and other non-standard tags are refused by SafeLoader.

Every problem is a :class:`~knowpress.core.errors.RecipeError` of one line; values are echoed at
most :data:`~knowpress.core.errors.ECHO_CHARS` characters long.
"""

from __future__ import annotations

from typing import Any

import yaml

from knowpress.core.errors import RecipeError, short

MAX_VALUES = 100_000
MAX_DEPTH = 64


MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        """A key given twice among the mapping's own keys (merged ``<<`` keys may be
        overridden: that is what merging is for)."""
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else []
                for base in [value_node, *merged]:
                    if isinstance(base, yaml.MappingNode):
                        self._check_duplicates(base)
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                twice = f"key {short(key)!r} is given twice (lines {first} and {line})"
                raise RecipeError([f"<yaml>: {twice}; keep one"])
            seen[key] = line

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)  # merges ``<<: *base`` keys


def _size(value: Any, depth: int, memo: dict[int, int]) -> int:
    """Values in ``value`` once aliases are expanded (shared objects counted each time)."""
    if depth > MAX_DEPTH:
        raise RecipeError([f"<yaml>: nested deeper than {MAX_DEPTH} levels; flatten the recipe"])
    if not isinstance(value, dict | list):
        return 1
    if id(value) in memo:
        return memo[id(value)]
    children = value.values() if isinstance(value, dict) else value
    total = 1 + sum(_size(child, depth + 1, memo) for child in children)
    memo[id(value)] = total
    if total > MAX_VALUES:
        big = f"the document expands to more than {MAX_VALUES:,} values (YAML aliases?)"
        raise RecipeError([f"<yaml>: {big}; write the recipe out without them"])
    return total


def load_yaml(text: str, what: str = "<yaml>") -> Any:
    """Parse ``text`` with the checks above; ``what`` names the text in error lines."""
    if "\x00" in text:
        raise RecipeError([f"{what}: not a text file (it contains NUL bytes)"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except RecipeError as exc:
        raise RecipeError([line.replace("<yaml>", what, 1) for line in exc.lines]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{what}: not valid YAML at {where}: {short(problem)}"]) from None
    except RecursionError:
        raise RecipeError([f"{what}: nested deeper than {MAX_DEPTH} levels"]) from None
    try:
        _size(data, 0, {})
    except RecipeError as exc:
        raise RecipeError([line.replace("<yaml>", what, 1) for line in exc.lines]) from None
    return data
