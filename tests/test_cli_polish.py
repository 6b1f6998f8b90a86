"""The CLI's surface: ``-q`` silences every progress bar (the libraries' too), ``compress
list`` prints whole names at any width, ``--help`` describes every option in plain text,
``compress export --store``."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from knowpress.cli.app import EXIT_USER, build_parser, main

BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # what a tqdm bar prints


def test_quiet_libraries_silences_tqdm_and_the_hub_and_restores_them() -> None:
    import huggingface_hub.utils as hub
    from tqdm import tqdm

    from knowpress.cli.quiet import quiet_libraries

    buffer = io.StringIO()
    before = hub.are_progress_bars_disabled()
    with quiet_libraries(True):
        assert hub.are_progress_bars_disabled()
        for _ in tqdm(range(3), file=buffer, desc="Compressing model"):
            pass
    assert buffer.getvalue() == ""
    assert hub.are_progress_bars_disabled() == before
    for _ in tqdm(range(3), file=buffer):  # back to normal afterwards
        pass
    assert BAR.search(buffer.getvalue())


def test_apply_quiet_prints_no_bar(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """A real process: compressed-tensors compresses the stage's weights with a tqdm bar,
    transformers loads them with another; -q shows neither."""
    stage = {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32},
             "format": "compressed-tensors"}  # fmt: skip
    recipe = {"version": 1, "model": {"world": "test-tiny"}, "stages": [stage],
              "evaluate": {"tasks": ["recall"], "max_items": 4}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "knowpress.cli", "apply", str(path), "-o", str(tmp_path / "o")]
    done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not BAR.search(done.stderr), done.stderr[-2000:]
    assert done.stderr.strip() == ""


def test_list_prints_every_name_whole_in_a_narrow_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import knowpress.cli.app
    from knowpress.cli.list import families

    buffer = io.StringIO()
    monkeypatch.setattr(knowpress.cli.app, "out", Console(file=buffer, width=30))
    assert main(["list"]) == 0
    text = buffer.getvalue()
    assert "…" not in text
    rows = [line.split() for line in text.splitlines()]
    for family, entries in families():
        for name in entries:
            assert any(name in row and family.split()[0] in row for row in rows), name
    assert any(row[:3] == ["bit", "plan", "moe_lp"] for row in rows)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def test_help_describes_every_option_in_plain_text() -> None:
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog}: {action.dest} has no help"
        text = parser.format_help()
        assert "``" not in text and not re.search(r":\w+:`", text), parser.prog
        assert parser.description, parser.prog


def test_export_store_is_a_choice(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from knowpress.cli.export import _config

    args = build_parser().parse_args(["export", "m", "-o", "x", "--store", "float16"])
    assert _config(args).store == "float16"
    assert _config(build_parser().parse_args(["export", "m", "-o", "x"])).store == "float32"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_teacher_dir), "-o", str(tmp_path / "b"), "--store", "int8"])
    assert exc.value.code == EXIT_USER
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--store: invalid choice: 'int8'" in err
