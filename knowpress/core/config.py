"""The base of every validated config: frozen, unknown fields rejected, self-describing, and
strict about numbers and booleans.

YAML tells ``true``, ``1`` and ``1.0`` apart, and so do recipes: an ``int`` field takes only
whole numbers (not ``true``, not ``4.0``), a ``float`` field takes numbers (``lr: 1`` is 1.0)
but not booleans, a ``bool`` field only ``true``/``false``, and a ``Literal`` of numbers no
boolean (``version: true`` is not version 1). pydantic's lax mode would read ``bits: true``
as 1 and ``min_retention: true`` as 1.0. Lists, tuples and strings keep pydantic's usual
rules. One mechanism for every subclass: the core schema's ``int`` / ``float`` / ``bool``
nodes are made strict (:func:`strict_numbers`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

_NUMBER_TYPES = ("int", "float", "bool")


def _refuse_bools(expected: list[Any]) -> Any:
    shown = [repr(v) for v in expected]
    allowed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("literal_error", f"Input should be {allowed}")
        return value

    return check


def strict_numbers(node: Any) -> Any:
    """``node`` (a pydantic core schema, walked recursively) with strict numbers and
    booleans, and numeric ``Literal``s that refuse booleans."""
    if isinstance(node, list):
        return [strict_numbers(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: strict_numbers(value) for key, value in node.items()}
    kind = node.get("type")
    if kind in _NUMBER_TYPES:
        node["strict"] = True
    elif kind == "literal":
        expected = node.get("expected", [])
        numeric = any(isinstance(v, int | float) and not isinstance(v, bool) for v in expected)
        if numeric and not any(isinstance(v, bool) for v in expected):
            return core_schema.no_info_before_validator_function(_refuse_bools(expected), node)
    return node


class FrozenConfig(BaseModel):
    """Stage kinds and methods subclass this; ``summary`` and ``paper`` feed ``compress list``
    and the README's method table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[BaseModel], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return strict_numbers(handler(source))  # type: ignore[no-any-return]
