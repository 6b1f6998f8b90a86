"""knowpress: compress language models while keeping what they know.

Public API (imports are lazy: importing knowpress loads no model and no torch)::

    from knowpress import load_recipe, apply
    result = apply(load_recipe("recipes/quickstart.yaml"), "runs/quickstart")
"""

from __future__ import annotations

from typing import Any

__all__ = ["KnowpressError", "RecipeError", "apply", "check", "load_recipe", "load_report"]


def __getattr__(name: str) -> Any:
    if name in ("KnowpressError", "RecipeError"):
        from knowpress import errors

        return getattr(errors, name)
    if name == "load_recipe":
        from knowpress.recipe import load_recipe

        return load_recipe
    if name == "apply":
        from knowpress.runner import apply

        return apply
    if name == "check":
        from knowpress.evaluate.gate import check

        return check
    if name == "load_report":
        from knowpress.report import load_report

        return load_report
    raise AttributeError(f"module 'knowpress' has no attribute {name!r}")
