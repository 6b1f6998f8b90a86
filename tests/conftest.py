"""Shared fixtures: one tiny fact-world teacher per test session, in a private cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def knowpress_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point KNOWPRESS_CACHE at a session folder (CI may pre-set one to reuse a teacher)."""
    preset = os.environ.get("KNOWPRESS_CACHE")
    cache = Path(preset) if preset else tmp_path_factory.mktemp("knowpress-cache")
    old = os.environ.get("KNOWPRESS_CACHE")
    os.environ["KNOWPRESS_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("KNOWPRESS_CACHE", None)
    else:
        os.environ["KNOWPRESS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_teacher_dir(knowpress_cache: Path) -> Path:
    """The ``test-tiny`` preset's trained teacher (built once, ~15 s on 2 CPU cores)."""
    from knowpress.teachers import build_teacher

    return build_teacher("test-tiny", progress=False)


@pytest.fixture
def dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Callable[[dict[str, Any]], tuple[int, str]]:
    """``compress apply RECIPE -o tmp_path/out --dry-run`` on a recipe dict: exit code and
    stderr."""
    import yaml

    from knowpress.cli import main

    def run(recipe: dict[str, Any]) -> tuple[int, str]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        capsys.readouterr()
        code = main(["apply", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
        return code, capsys.readouterr().err.strip()

    return run
