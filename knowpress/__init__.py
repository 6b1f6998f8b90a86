"""knowpress: compress language models while keeping what they know.

Public API (imports are lazy: importing knowpress loads no model and no torch)::

    from knowpress import load_recipe, apply
    result = apply(load_recipe("recipes/quickstart.yaml"), "runs/quickstart")
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KnowpressError",
    "RecipeError",
    "apply",
    "build_teacher",
    "check",
    "load_model",
    "load_recipe",
    "load_report",
    "load_world",
]

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "load_recipe": "knowpress.pipeline.recipe",
    "apply": "knowpress.pipeline.runner",
    "check": "knowpress.evaluate.gate",
    "load_report": "knowpress.pipeline.report",
    "load_model": "knowpress.formats.io",
    "build_teacher": "knowpress.teachers",
    "load_world": "knowpress.worlds",
}


def __getattr__(name: str) -> Any:
    if name in ("KnowpressError", "RecipeError"):
        from knowpress.core import errors

        return getattr(errors, name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'knowpress' has no attribute {name!r}")
