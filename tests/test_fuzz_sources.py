"""What a run reads besides the recipe, malformed: a teacher or a Delta-KD base of another
vocabulary, texts holding NUL bytes. Each is one error line (exit 2) before any work, the
dry run included, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_fuzz_inputs import DISTILL, _one_error_line, _other_tokenizer, _teacher_copy, recipe, run

from knowpress.cli.app import EXIT_USER


def _apply_refused(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for extra in (["--dry-run"], []):
        code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q", *extra], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err), err
        assert not (tmp_path / "out").exists()


def test_a_teacher_or_base_of_another_vocabulary_is_refused_before_any_work(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _teacher_copy(tiny_teacher_dir, tmp_path, "other")
    _other_tokenizer(other)
    base = {"name": "delta_kd", "teacher_base": {"path": str(other)}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"teacher": {"path": str(other)}, "stages": [DISTILL]}, "teacher: its tokenizer is not"),
        ({"stages": [DISTILL | {"loss": base}]}, "stages.0.loss.teacher_base: its tokenizer"),
    ]
    for changes, expected in cases:
        _apply_refused(recipe(**changes), expected, tmp_path, capsys)
    # the same folder as a teacher of a stage that needs none is not compared
    path = tmp_path / "quantize.yaml"
    path.write_text(recipe(teacher={"path": str(other)}))
    code, err = run(["apply", str(path), "--dry-run"], capsys)
    assert code == 0, err


NUL_TEXTS = [
    ("notes.txt", b"first paragraph\n\nsecond\x00paragraph\n", "a NUL byte at offset 23"),
    ("notes.jsonl", b'{"text": "fine"}\n{"text": "not\\u0000fine"}\n', "notes.jsonl:2: the text"),
]


@pytest.mark.parametrize(("name", "data", "expected"), NUL_TEXTS, ids=["txt", "jsonl escape"])
def test_text_with_nul_bytes_is_one_line(
    name: str, data: bytes, expected: str, tiny_teacher_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    text = tmp_path / name
    text.write_bytes(data)
    evaluate = {"tasks": ["recall", "kl"], "max_items": 8, "text": {"path": str(text)}}
    _apply_refused(recipe(evaluate=evaluate), expected, tmp_path, capsys)
    calibration = {"calibration": {"path": str(text)}}
    quantize = [{"kind": "quantize", "method": {"name": "gptq", "bits": 4, "group_size": 32}}]
    run_path = tmp_path / "gptq.yaml"
    run_path.write_text(recipe(data=calibration, stages=quantize))
    code, err = run(["apply", str(run_path), "-o", str(tmp_path / "gptq"), "-q"], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)
    assert "data.calibration.path" in err or name.endswith(".jsonl")
    argv = ["eval", "--model", str(tiny_teacher_dir), "--text", str(text), "--tasks", "perplexity"]
    code, err = run([*argv, "-q"], capsys)
    line = _one_error_line(err)
    assert code == EXIT_USER and expected in line
    assert line.startswith("error: --text:") or name.endswith(".jsonl")


def test_a_teacher_cache_under_a_file_is_refused(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache's parent folder would go")
    stage = DISTILL | {"teacher_cache": {"path": str(blocker / "cache")}}
    _apply_refused(recipe(stages=[stage]), "goes through the file", tmp_path, capsys)
    assert json.loads(json.dumps(stage))  # the recipe itself is plain data
