"""Packaging promises: no import-time side effects, the CI runs the README's command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_loads_no_torch() -> None:
    code = "import sys, knowpress; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_resolves() -> None:
    import knowpress

    for name in knowpress.__all__:
        assert callable(getattr(knowpress, name)) or isinstance(getattr(knowpress, name), type)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert test_line in readme
    assert "pytest" in test_line


def _world_data_missing(preset: str | None) -> str | None:
    """Why a preset's world cannot be made on this machine (real-fact data absent), or None."""
    from knowpress.errors import KnowpressError
    from knowpress.world import PRESETS
    from knowpress.world.teacher import make_world

    if preset is None:
        return None
    try:
        make_world(PRESETS.get(preset).world)
    except KnowpressError as exc:
        return str(exc)
    return None


def test_every_recipe_validates_and_dry_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from knowpress.cli import EXIT_USER, main
    from knowpress.recipe import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        missing = _world_data_missing(load_recipe(path).model.world)
        code = main(["apply", str(path), "-o", str(tmp_path / path.stem), "--dry-run"])
        if missing:  # the dry run checks the world too: one line saying the data is absent
            assert code == EXIT_USER and "no LRE data" in capsys.readouterr().err
        else:
            assert code == 0
        assert not (tmp_path / path.stem).exists()
