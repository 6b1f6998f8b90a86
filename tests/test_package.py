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


def test_every_recipe_validates_and_dry_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from knowpress.cli.app import main
    from knowpress.pipeline.recipe import load_recipe
    from knowpress.worlds.lre import LRE_ENV

    monkeypatch.delenv(LRE_ENV, raising=False)
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:  # real-fact worlds too: their data ships in the package
        load_recipe(path)
        code = main(["apply", str(path), "-o", str(tmp_path / path.stem), "--dry-run"])
        assert code == 0, capsys.readouterr().err
        assert not (tmp_path / path.stem).exists()


def test_ci_example_gates_against_its_committed_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """examples/ci/knowledge-gate.yml runs a recipe that exists and checks its report against
    the committed baseline, which is a report of that recipe that passes its own gate."""
    import yaml

    from knowpress.cli.app import main
    from knowpress.pipeline.recipe import load_recipe

    workflow = yaml.safe_load((ROOT / "examples/ci/knowledge-gate.yml").read_text())
    commands = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    apply = next(c for c in commands if c.startswith("compress apply "))
    check = next(c for c in commands if c.startswith("compress check "))
    recipe = apply.split()[2]
    assert (ROOT / recipe).is_file()
    baseline = check.split("--baseline ")[1].split()[0]
    report = yaml.safe_load((ROOT / baseline).read_text())  # JSON is YAML
    ours = load_recipe(ROOT / recipe).dump()
    for key in ("stages", "gate"):  # the baseline is a run of the recipe as committed
        assert report["recipe"][key] == ours[key], key
    assert main(["check", str(ROOT / baseline), "--baseline", str(ROOT / baseline)]) == 0
    assert "gate passed" in capsys.readouterr().out
