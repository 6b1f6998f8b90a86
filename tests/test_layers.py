"""The package's layers, enforced: a module imports only from its own layer or the ones below
it, at module level and inside functions alike (type-checking imports included).

    core < tensors < arch < formats < methods < runtimes < worlds < evaluate < teachers
         < pipeline < cli

``knowpress/__init__.py`` (the public face) and ``knowpress/testing`` (helpers for tests)
stand above them all. A new top-level folder must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knowpress"
LAYERS = ("core", "tensors", "arch", "formats", "methods", "runtimes", "worlds", "evaluate",
          "teachers", "pipeline", "cli")  # fmt: skip
FACE = {"", "testing"}  # above every layer


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module under knowpress) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(
        ".")[:-1]  # fmt: skip
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
                out.append((node.lineno, name))
            elif node.module and node.module.split(".")[0] == "knowpress":
                name = node.module.removeprefix("knowpress").lstrip(".")
                if not name:  # from knowpress import x: x is the module
                    out += [(node.lineno, alias.name) for alias in node.names]
                else:
                    out.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("knowpress").lstrip("."))
                    for a in node.names if a.name.split(".")[0] == "knowpress"]  # fmt: skip
    return out


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top in FACE:
        return len(LAYERS)
    assert top in LAYERS, f"knowpress/{top} has no layer: add it to tests/test_layers.py"
    return LAYERS.index(top)


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_folder_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).parts[0] for p in FILES if len(p.relative_to(PACKAGE).parts) > 1}
    assert tops - FACE <= set(LAYERS), sorted(tops - FACE - set(LAYERS))
    assert {p.stem for p in PACKAGE.glob("*.py")} == {"__init__"}  # no loose modules


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_no_import_from_a_higher_layer(path: Path) -> None:
    own = _layer(_module(path))
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports knowpress.{name}"
              for line, name in _imports(path) if _layer(name) > own]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    """A local import is found like a module-level one (the test can fail)."""
    source = "def f():\n    from knowpress.pipeline.runner import apply\n"
    fake = PACKAGE / "core" / "_layer_probe.py"
    try:
        fake.write_text(source)
        assert _imports(fake) == [(2, "pipeline.runner")]
        assert _layer("pipeline.runner") > _layer(_module(fake))
    finally:
        fake.unlink()
