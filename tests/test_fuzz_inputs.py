"""Malformed input, as a new user or a careless CI script writes it: every case is one error
line (exit 2, or 1 for a real gate failure), never a traceback, and nothing half-written.

Classes (issue "Hardening"): false-green gates, duplicate YAML keys, output folders, bounded
messages and alias bombs, corrupt model files, tasks a world cannot serve, shapes a stage
cannot take (found before any work), reports that are not reports, eval arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowpress.cli.app import EXIT_GATE, EXIT_USER, main

GOOD: dict[str, Any] = {
    "version": 1,
    "model": {"world": "test-tiny"},
    "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}}],
    "evaluate": {"tasks": ["recall", "perplexity"], "max_items": 8},
    "gate": {"min_retention": 0.5},
}
Text = str | bytes


def recipe(**changes: Any) -> str:
    return yaml.safe_dump({**GOOD, **changes}, sort_keys=False)


def stage(**fields: Any) -> list[dict[str, Any]]:
    return [{**GOOD["stages"][0], **fields}]


def method(**fields: Any) -> list[dict[str, Any]]:
    return stage(method={**GOOD["stages"][0]["method"], **fields})


DISTILL: dict[str, Any] = {"kind": "distill", "train": {"steps": 2, "batch_size": 4}}


def student(**config: Any) -> dict[str, Any]:
    return DISTILL | {"student": {"make": "config", "config": config}}


MERGE = recipe(stages=[]).replace("stages: []\n", "") + (
    "stages:\n- kind: quantize\n  method: &m {name: rtn, bits: 8, group_size: 32}\n"
    "- kind: quantize\n  method: {<<: *m, bits: 4}\n"
)
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
DEEP = "version: 1\nmodel: " + "[" * 200 + "]" * 200 + "\n"

# (id, recipe text, the substring the one error line must hold)
RECIPES: list[tuple[str, Text, str]] = [
    ("empty", "", "the file is empty"),
    ("not utf-8", b"version: 1\nmodel: {world: \xff\xfe}\n", "not UTF-8 text (byte 0xff"),
    ("binary", b"\x00\x01\x02version", "not a text file"),
    ("a list", "- 1\n- 2\n", "expected a mapping, got list"),
    ("bad yaml", "version: 1\nmodel: {world: [\n", "not valid YAML at line"),
    ("duplicate gate", recipe() + "gate: {min_retention: 0.1}\n", "key 'gate' is given twice"),
    ("duplicate stages", recipe() + "stages: []\n", "key 'stages' is given twice (lines"),
    (
        "duplicate nested",
        "version: 1\nmodel: {world: test-tiny, world: bios-dense-tiny}\n",
        "key 'world' is given twice (lines 2 and 2)",
    ),
    ("billion laughs", "version: 1\n" + LAUGHS, "expands to more than 100,000 values"),
    ("deep nesting", DEEP, "nested deeper than"),
    ("python tag", "version: 1\nmodel: !!python/object:os.system {}\n", "not valid YAML"),
    ("no version", yaml.safe_dump({"model": GOOD["model"]}), "version: required field"),
    ("version 2", recipe(version=2), "version: Input should be 1"),
    ("unknown field", recipe(stagez=[]), "stagez: unknown field"),
    ("unknown kind", recipe(stages=[{"kind": "quantise"}]), "unknown stage kind 'quantise'"),
    ("unknown method", recipe(stages=method(name="rtm")), "unknown method 'rtm'"),
    ("bits 5", recipe(stages=method(bits=5)), "bits: Input should be 2, 3, 4 or 8"),
    ("group 0", recipe(stages=method(group_size=0)), "group_size: Input should be greater"),
    ("floor 0", recipe(gate={"min_retention": 0}), "min_retention: Input should be greater"),
    ("floor -1", recipe(gate={"min_retention": -1}), "min_retention: Input should be greater"),
    ("floor nan", recipe().replace("0.5", ".nan"), "min_retention: Input should be a finite"),
    ("floor 1.5", recipe(gate={"min_retention": 1.5}), "less than or equal to 1"),
    ("gate, no stage", recipe(stages=[]), "the recipe has no stages"),
    (
        "gate task",
        recipe(gate={"min_retention": 0.9, "tasks": ["bits"]}),
        "gate.tasks ['bits'] are not evaluated",
    ),
    ("unknown task", recipe(evaluate={"tasks": ["recal"]}), "unknown eval task 'recal'"),
    ("two_hop", recipe(evaluate={"tasks": ["two_hop"]}), "two_hop cannot be scored on this world"),
    ("unknown world", recipe(evaluate={"world": "bios-nope"}), "bios-nope"),
    ("world+path", recipe(model={"world": "test-tiny", "path": "x"}), "give exactly one of"),
    ("missing path", recipe(model={"path": "./nope"}), "./nope does not exist"),
    ("device", recipe(device="gpu"), "'gpu' is not a device"),
    ("dtype", recipe(model={"world": "test-tiny", "dtype": "int4"}), "model.dtype: Input"),
    ("huge kind", recipe(stages=[{"kind": "q" * 900_000}]), "unknown stage kind 'qqqq"),
    ("huge key", recipe(**{"k" * 900_000: 1}), "kkkk"),
    (
        "plan rule typo",
        recipe(stages=stage(plan={"rules": [{"match": "*.dwn_proj", "bits": 8}]})),
        "quantize.plan.rules.0: '*.dwn_proj' matches no targeted tensor",
    ),
    (
        "plan bits 5",
        recipe(stages=stage(plan={"rules": [{"match": "*", "bits": 5}]})),
        "plan.rules.0.bits: Input should be 2, 3, 4 or 8",
    ),
    ("target typo", recipe(stages=stage(targets=["*.dwn_proj"])), "'*.dwn_proj' matches no"),
    ("ignore all", recipe(stages=stage(ignore=["*"])), "targets minus ignore leave no tensor"),
    ("bad regex", recipe(stages=stage(targets=["re:("])), "'re:(' is not a valid regex"),
    ("teacher str", recipe(teacher="bigger"), "teacher: expected 'same' or a mapping"),
    # floats, ints and booleans are told apart (config.py: strict numbers)
    ("bits true", recipe(stages=method(bits=True)), "bits: Input should be 2, 3, 4 or 8 (got true"),
    ("group 32.0", recipe(stages=method(group_size=32.0)), "expected a whole number, got 32.0"),
    ("floor true", recipe(gate={"min_retention": True}), "min_retention: expected a number, got t"),
    ("version true", recipe(version=True), "version: Input should be 1 (got true, a boolean)"),
    ("trust 1", recipe(model={"world": "test-tiny", "trust_remote_code": 1}), "true or false"),
    ("items true", recipe(evaluate={"max_items": True}), "max_items: expected a whole number"),
    ("steps true", recipe(stages=[DISTILL | {"train": {"steps": True}}]), "train.steps: expected"),
    ("lr true", recipe(stages=[DISTILL | {"train": {"lr": True}}]), "train.lr: expected a number"),
    ("symmetric 1", recipe(stages=method(symmetric=1)), "symmetric: expected true or false"),
    # merge keys merge; a key twice among a mapping's own keys is still refused
    ("merge twice", MERGE.replace("bits: 4}", "bits: 4, bits: 2}"), "key 'bits' is given twice"),
    # a distill student that cannot be built, or keeps no layer: refused before any work
    ("student str", recipe(stages=[student(num_hidden_layers="two")]), ".num_hidden_layers: exp"),
    ("student 0 layers", recipe(stages=[student(num_hidden_layers=0)]), "number >= 1, got 0"),
    ("student float", recipe(stages=[student(hidden_size=32.5)]), "hidden_size: expected a whole"),
    ("student bool", recipe(stages=[student(tie_word_embeddings=1)]), "like the model's own"),
    ("student heads", recipe(stages=[student(num_attention_heads=3)]), "with these values cannot"),
    ("cache is a file", recipe(stages=[DISTILL | {"teacher_cache": {"path": __file__}}]), "a file"),
    ("moe dense", recipe(stages=[DISTILL | {"moe_teacher": {"augment": 2}}]), "teacher is dense"),
    # KV policies: a budget is an int token count or a share in (0, 1), never a bool or 1.0
    (
        "kv budget 1.0",
        recipe(stages=[{"kind": "compress_kv", "policy": {"name": "streaming"}, "budget": 1.0}]),
        "1.0 is not a share in (0, 1)",
    ),
    (
        "kv budget true",
        recipe(stages=[{"kind": "compress_kv", "policy": {"name": "streaming"}, "budget": True}]),
        "True is not a budget",
    ),
    (
        "policy budget true",
        recipe(stages=[{"kind": "compress_kv", "policy": {"name": "h2o", "budget": True}}]),
        "True is not a budget",
    ),
    # a KV policy that cannot fit the model is refused before the reference is scored
    (
        "kivi group",
        recipe(stages=[{"kind": "compress_kv", "policy": {"name": "kivi", "group_size": 64}}]),
        "group_size 64 does not divide the head dim 32",
    ),
    (
        "probe too long",
        recipe(
            stages=[
                {
                    "kind": "compress_kv",
                    "policy": {
                        "name": "head_budget",
                        "policy": {"name": "snapkv"},
                        "probe_length": 200,
                    },
                }
            ]
        ),
        "probe_length 200 makes 400-token probes",
    ),
    (
        "lm_eval task typo",
        recipe(evaluate={"tasks": ["recall"], "lm_eval": {"tasks": ["hellaswagg"]}}),
        "lm_eval.tasks: hellaswagg not found in the harness's built-in tasks (did you mean",
    ),
]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and len(lines[0]) < 800, lines[0][:300]
    assert "Traceback" not in err
    return lines[0]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``compress ARGV`` (argparse's own usage errors included)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code)  # type: ignore[arg-type]
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES]
)
def test_bad_recipe_is_one_line_and_writes_nothing(
    text: Text, expected: str, tiny_teacher_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for extra in ([], ["--dry-run"]):
        code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q", *extra], capsys)
        assert code == EXIT_USER
        assert expected in _one_error_line(err)
        assert not (tmp_path / "out").exists()


def _teacher_copy(tiny_teacher_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_teacher_dir, folder)
    return folder


def _truncated(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _empty(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)


def _config_list(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2]")


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _other_world(folder: Path) -> None:
    record = json.loads((folder / "knowpress_world.json").read_text())
    (folder / "knowpress_world.json").write_text(json.dumps({**record, "world_key": "0ther"}))


def _model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llamma"}))


def _config_value(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": "four"}))


def _changed_since_manifest(folder: Path) -> None:
    from knowpress.formats.manifest import build_manifest, write_manifest

    write_manifest(folder, build_manifest(folder, format="hf", dtype="float32"))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a weight's last byte: same size, header intact
    weights.write_bytes(bytes(data))


def _other_tokenizer(folder: Path) -> None:
    from knowpress.testing.models import tiny_tokenizer

    _no_tokenizer(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "knowpress_world.json").unlink()


# (id, how the copy of the teacher is spoiled, where it goes, the error's substring)
FOLDERS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("truncated weights", _truncated, "model", "truncated or corrupt safetensors"),
    ("empty weights", _empty, "model", "not a valid safetensors file (it is empty)"),
    ("garbage weights", _garbage, "model", "not a valid safetensors file"),
    ("config list", _config_list, "model", "config.json: not a JSON object"),
    ("no tokenizer", _no_tokenizer, "model", "no tokenizer files"),
    ("no config", _no_config, "model", "no config.json"),
    ("unknown model_type", _model_type, "model", "model_type 'llamma' is not an architecture"),
    ("config value", _config_value, "model", "expected int, got str (value: 'four'); fix"),
    ("changed stage", _changed_since_manifest, "model", "changed since it was written (sha256"),
    ("changed reference", _changed_since_manifest, "reference", "model.safetensors changed"),
    ("truncated reference", _truncated, "reference", "truncated or corrupt safetensors"),
    ("reference of another world", _other_world, "reference", "knows world 0ther"),
    ("reference of another vocabulary", _other_tokenizer, "reference", "tokenizer is not the"),
]


@pytest.mark.parametrize(
    ("spoil", "where", "expected"), [c[1:] for c in FOLDERS], ids=[c[0] for c in FOLDERS]
)
def test_bad_model_folder_is_one_line(
    spoil: Callable[[Path], None], where: str, expected: str, tiny_teacher_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    folder = _teacher_copy(tiny_teacher_dir, tmp_path, "m")
    spoil(folder)
    path = tmp_path / "r.yaml"
    path.write_text(recipe(**{where: {"path": str(folder)}}))
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)
    assert not (tmp_path / "out").exists()
    if where == "model":
        code, err = run(["eval", "--model", str(folder), "-q"], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err)


SETS = [
    ("no =", ["--set", "stages.0.method.bits"], "expected KEY=VALUE"),
    ("bad yaml", ["--set", "stages.0.method.bits=["], "--set stages.0.method.bits: not valid"),
    ("python tag", ["--set", "gate=!!python/object/apply:os.system [ls]"], "not valid YAML"),
    ("duplicate key", ["--set", "gate={min_retention: 0.9, min_retention: 0.1}"], "twice"),
    ("index", ["--set", "stages.5.method.bits=4"], "is not an index of a 1-item list"),
    ("into a scalar", ["--set", "version.x=1"], "goes inside a value that is not a map"),
    ("device", ["--device", "tpu"], "'tpu' is not a device"),
    ("both", ["--resume", "--force"], "contradict each other"),
    ("usage", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in SETS], ids=[c[0] for c in SETS])
def test_bad_apply_arguments_are_one_line(
    extra: list[str], expected: str, tiny_teacher_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(recipe())
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q", *extra], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_output_folder_rules_are_one_line(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe())
    (tmp_path / "file").write_text("x")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    cases = [
        (["-o", str(tmp_path / "file")], "is a file; choose a folder"),
        (["-o", str(user)], "already exists; pass --resume"),
        (["-o", str(user), "--resume"], "is not a knowpress run"),
        (["-o", str(user), "--force"], "--force: " + str(user) + " is not a knowpress run"),
    ]
    for extra, expected in cases:
        code, err = run(["apply", str(path), "-q", *extra], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]  # not even a lock file
    for bad, expected in [(tmp_path, "not a regular file"), (tmp_path / "no.yaml", "not found")]:
        code, err = run(["apply", str(bad), "-q"], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    code, err = run(["apply", str(fifo), "-q"], capsys)  # would block forever if read
    assert code == EXIT_USER and "not a regular file" in _one_error_line(err)
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n#" + "x" * 2_000_000)
    code, err = run(["apply", str(big), "-q"], capsys)
    assert code == EXIT_USER and "is not a recipe (over 1 MB)" in _one_error_line(err)


@pytest.fixture(scope="module")
def report_path(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-report")
    (root / "r.yaml").write_text(recipe())
    assert main(["apply", str(root / "r.yaml"), "-o", str(root / "out"), "-q"]) == 0
    return root / "out" / "report.json"


def _edited(report_path: Path, tmp: Path, edit: Callable[[dict[str, Any]], Any]) -> str:
    data = json.loads(report_path.read_text())
    result = edit(data)
    path = tmp / "edited.json"
    path.write_text(result if isinstance(result, str) else json.dumps(data))
    return str(path)


def _rows_empty(d: dict[str, Any]) -> None:
    d["rows"] = []


def _row_no_name(d: dict[str, Any]) -> None:
    del d["rows"][-1]["name"]


def _retention_text(d: dict[str, Any]) -> None:
    d["rows"][-1]["retention"]["recall"] = "high"


def _only_reference(d: dict[str, Any]) -> None:
    d["rows"] = d["rows"][:1]


def _schema_99(d: dict[str, Any]) -> None:
    d["schema_version"] = 99


def _tasks_list(d: dict[str, Any]) -> None:
    d["tasks"] = ["recall"]


def _gate_text(d: dict[str, Any]) -> None:
    d["gate"] = "passed"


def _truncate(d: dict[str, Any]) -> str:
    return json.dumps(d)[:500]


def _not_report(d: dict[str, Any]) -> str:
    return '{"schema": "other"}'


REPORTS: list[tuple[str, Callable[[dict[str, Any]], Any], list[str], str]] = [
    ("rows empty", _rows_empty, [], "rows: List should have at least 1 item"),
    ("row without name", _row_no_name, [], "rows.1.name: Field required"),
    ("retention text", _retention_text, [], "rows.1.retention.recall: Input should be a valid"),
    ("only the reference", _only_reference, ["--min-retention", "0.9"], "nothing to gate"),
    ("schema 99", _schema_99, [], "schema_version 99 is not supported"),
    ("tasks list", _tasks_list, [], "tasks: Input should be a valid dictionary"),
    ("gate text", _gate_text, [], "gate: Input should be a valid dictionary"),
    ("truncated", _truncate, [], "not valid JSON"),
    ("not a report", _not_report, [], "not a knowpress report"),
    ("floor 0", lambda d: None, ["--min-retention", "0"], "--min-retention: 0.0 is not a"),
    ("floor -1", lambda d: None, ["--min-retention", "-1"], "--min-retention: -1.0 is not"),
    ("floor nan", lambda d: None, ["--min-retention", "nan"], "--min-retention: nan is not"),
    ("floor inf", lambda d: None, ["--min-retention", "inf"], "--min-retention: inf is not"),
    ("tolerance nan", lambda d: None, ["--tolerance", "nan"], "--tolerance: nan is not"),
    ("unknown task", lambda d: None, ["--tasks", "recal"], "'recal' is not in the report"),
    ("floor word", lambda d: None, ["--min-retention", "high"], "invalid float value: 'high'"),
]


@pytest.mark.parametrize(
    ("edit", "extra", "expected"), [c[1:] for c in REPORTS], ids=[c[0] for c in REPORTS]
)
def test_bad_report_or_threshold_is_one_line(
    edit: Callable[[dict[str, Any]], Any], extra: list[str], expected: str, report_path: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = _edited(report_path, tmp_path, edit)
    code, err = run(["check", path, *extra], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)


def test_baselines_must_match_and_a_gate_that_gates_nothing_fails(
    report_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def other_world(d: dict[str, Any]) -> None:
        d["inputs"]["world"]["key"] = "0ther"

    def fewer_tasks(d: dict[str, Any]) -> None:
        del d["tasks"]["perplexity"]

    for edit, expected in [(other_world, "it measured world 0ther"), (fewer_tasks, "no perplex")]:
        baseline = _edited(report_path, tmp_path, edit)
        code, err = run(["check", str(report_path), "--baseline", baseline], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code, err = run(["check", str(fifo), "--min-retention", "0.9"], capsys)
    assert code == EXIT_USER and "not a regular file" in _one_error_line(err)

    def all_near_chance(d: dict[str, Any]) -> None:
        for info in d["tasks"].values():
            info["near_chance"] = True

    path = _edited(report_path, tmp_path, all_near_chance)
    capsys.readouterr()
    assert main(["check", path, "--min-retention", "0.5"]) == EXIT_GATE  # gated nothing: fails
    captured = capsys.readouterr()
    assert "nothing gated" in captured.out and "Traceback" not in captured.err


EVALS = [
    ("max items 0", ["--max-items", "0"], "argument --max-items: 0 is not positive"),
    ("batch size 0", ["--batch-size", "0"], "argument --batch-size: 0 is not positive"),
    ("batch size word", ["--batch-size", "lots"], "'lots' is not a whole number"),
    ("unknown task", ["--tasks", "recal"], "unknown eval task 'recal'"),
    ("two_hop", ["--tasks", "two_hop"], "two_hop cannot be scored on this world"),
    ("unknown world", ["--world", "bios-nope"], "bios-nope"),
    ("device", ["--device", "tpu"], "'tpu' is not a device"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in EVALS], ids=[c[0] for c in EVALS])
def test_bad_eval_arguments_are_one_line(
    extra: list[str], expected: str, tiny_teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["eval", "--model", str(tiny_teacher_dir), "-q", *extra], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)


def test_eval_paths_are_one_line(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--model", str(tmp_path / "nope")], "nope does not exist"),
        (["--model", str(tiny_teacher_dir), "--json", str(tmp_path)], "--json: "),
    ]
    for extra, expected in cases:
        code, err = run(["eval", "-q", *extra], capsys)
        assert code == EXIT_USER and expected in _one_error_line(err)


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "https://127.0.0.1:9"}],
    ids=["offline", "down"],
)
def test_an_unreachable_hub_id_fails_at_once_in_one_line(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "r.yaml"
    path.write_text(recipe(model={"path": "someorg/not-cached"}, evaluate={"world": "test-tiny"}))
    start = time.monotonic()
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == EXIT_USER and "cannot be reached from here" in _one_error_line(err)
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists()


def test_disk_full_while_saving_is_one_line_and_leaves_no_stage(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    def full(*args: Any, **kwargs: Any) -> None:  # what safetensors raises on ENOSPC
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" })'
        )

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    path = tmp_path / "r.yaml"
    path.write_text(recipe())
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == EXIT_USER and "disk full while writing" in _one_error_line(err)
    stages = tmp_path / "out" / "stages"
    assert not stages.exists() or not list(stages.iterdir())  # no stage, no temporary


def test_an_internal_error_is_exit_3_with_the_traceback_behind_debug(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from knowpress.cli.app import EXIT_BUG
    from knowpress.pipeline.stages.quantize import Quantize

    def bug(self: Any, ctx: Any, progress: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Quantize, "run", bug)
    path = tmp_path / "r.yaml"
    path.write_text(recipe())
    code, err = run(["apply", str(path), "-o", str(tmp_path / "a"), "-q"], capsys)
    line = _one_error_line(err)
    assert code == EXIT_BUG and "internal error (ZeroDivisionError: division by zero)" in line
    assert "--debug" in line
    code, err = run(["apply", str(path), "-o", str(tmp_path / "b"), "-q", "--debug"], capsys)
    assert code == EXIT_BUG and "Traceback" in err and "ZeroDivisionError" in err


# Issue 27 (gating that means it): report fields the gate reads are typed strictly (a boolean
# or a string is not a number), gate options it cannot mean are usage errors (exit 2).
def _retention_true(d: dict[str, Any]) -> None:
    d["rows"][-1]["retention"]["recall"] = True


def _score_text(d: dict[str, Any]) -> None:
    d["rows"][-1]["scores"]["recall"] = "0.9"


def _kl_text(d: dict[str, Any]) -> None:
    d["tasks"]["kl"] = {"metric": "kl_nats_per_token", "higher_is_better": False,
                        "relative": False, "chance": None, "near_chance": False}  # fmt: skip
    for row in d["rows"]:
        row["scores"]["kl"] = "0.1"
        row["details"]["kl"] = {"n": 1, "extra": {"top1": 0.9}, "examples": []}


def _top1_true(d: dict[str, Any]) -> None:
    _kl_text(d)
    for row in d["rows"]:
        row["scores"]["kl"] = 0.01
        row["details"]["kl"]["extra"]["top1"] = True


def _near_chance_text(d: dict[str, Any]) -> None:
    d["tasks"]["recall"]["near_chance"] = "no"


def _schema_true(d: dict[str, Any]) -> None:
    d["schema_version"] = True


def _item_true(d: dict[str, Any]) -> None:
    d["rows"][-1]["items"]["recall"]["columns"]["correct"][0] = True


def _statistic_word(d: dict[str, Any]) -> None:
    d["rows"][-1]["items"]["recall"]["statistic"] = "median"


def _columns_uneven(d: dict[str, Any]) -> None:
    d["rows"][-1]["items"]["perplexity"]["columns"]["tokens"].pop()


def _column_missing(d: dict[str, Any]) -> None:
    del d["rows"][0]["items"]["recall"]["columns"]["correct"]


def _flag_word(d: dict[str, Any]) -> None:
    d["rows"][-1]["compression"] = {"flag": "maybe", "note": None}


def _gate_confidence_text(d: dict[str, Any]) -> None:
    d["gate"]["confidence"] = "0.95"


def _schema_2(d: dict[str, Any]) -> None:
    d["schema_version"] = 2
    for row in d["rows"]:
        del row["items"]


STRICT_REPORTS: list[tuple[str, Callable[[dict[str, Any]], Any], list[str], str]] = [
    ("retention true", _retention_true, [], "rows.1.retention.recall: Input should be a valid num"),
    ("score text", _score_text, [], "rows.1.scores.recall: Input should be a valid number"),
    ("kl text", _kl_text, ["--max-kl", "0.5"], "rows.0.scores.kl: Input should be a valid number"),
    ("top1 true", _top1_true, ["--min-top1", "0.5"], "rows.0.details.kl.extra.top1: Input should"),
    ("near chance text", _near_chance_text, [], "tasks.recall.near_chance: Input should be a"),
    ("schema true", _schema_true, [], "schema_version True is not supported"),
    ("item true", _item_true, [], "rows.1.items.recall.columns.correct.0: Input should be a valid"),
    ("flag word", _flag_word, [], "rows.1.compression.flag: Input should be 'grew' or 'unchanged'"),
    ("statistic word", _statistic_word, [], "rows.1.items.recall: statistic 'median' is not one"),
    ("columns uneven", _columns_uneven, [], "rows.1.items.perplexity: columns differ in length"),
    ("column missing", _column_missing, [], "rows.0.items.recall: columns: accuracy needs correct"),
    ("gate confidence text", _gate_confidence_text, [], "gate.confidence: Input should be a valid"),
    ("max-kl, no kl", lambda d: None, ["--max-kl", "0.5"], "--max-kl: the report has no kl task"),
    ("min-top1, no kl", lambda d: None, ["--min-top1", "0.5"], "--min-top1: the report has no kl"),
    ("confidence 1.5", lambda d: None, ["--confidence", "1.5"], "--confidence: 1.5 is not a conf"),
    ("confidence nan", lambda d: None, ["--confidence", "nan"], "--confidence: nan is not a conf"),
    ("confidence word", lambda d: None, ["--confidence", "high"], "invalid float value: 'high'"),
    ("strict alone", lambda d: None, ["--strict"], "--strict tests the interval's lower bound"),
    ("old report", _schema_2, ["--confidence", "0.95"], "keeps no per-item results"),
]


@pytest.mark.parametrize(
    ("edit", "extra", "expected"),
    [c[1:] for c in STRICT_REPORTS],
    ids=[c[0] for c in STRICT_REPORTS],
)
def test_a_report_or_gate_option_the_gate_cannot_read_is_one_line_exit_2(
    edit: Callable[[dict[str, Any]], Any], extra: list[str], expected: str, report_path: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = _edited(report_path, tmp_path, edit)
    code, err = run(["check", path, *extra], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)


def test_interval_options_gate_a_real_report(
    report_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same report through --confidence and --strict: exit 0 or 1, never an error, and
    the table of intervals printed either way."""
    for extra in (["--confidence", "0.95"], ["--confidence", "0.9", "--strict"]):
        capsys.readouterr()
        code = main(["check", str(report_path), "--min-retention", "0.5", *extra])
        captured = capsys.readouterr()
        assert code in (0, EXIT_GATE) and "Traceback" not in captured.err
        assert "CI" in captured.out and "exact McNemar" in captured.out


def test_eval_of_a_folder_without_a_world_points_to_its_own_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain HF folder (no knowpress_world.json): one line suggesting --text/--tasks kl, not
    "build a teacher"; with a text it is scored, its size against its own parameters."""
    from knowpress.testing.models import tiny_llama, tiny_tokenizer

    model = tmp_path / "model"
    tiny_llama(seed=3).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    code, err = run(["eval", "--model", str(model), "-q"], capsys)
    line = _one_error_line(err)
    assert code == EXIT_USER and "--text FILE --tasks kl --reference ORIGINAL" in line
    assert "build_teacher" not in line
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * j) % 50}" for j in range(30)) for i in range(8)))
    capsys.readouterr()
    argv = ["eval", "--model", str(model), "--text", str(text), "--tasks", "perplexity", "-q"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "parameters in bf16 (2 bytes each)" in out and "of its safetensors" not in out
    assert re.search(r"= 2\.0\d\d x its", out)  # a float32 folder: twice its bf16 parameters


GATES: list[tuple[str, dict[str, Any], str]] = [
    ("confidence true", {"min_retention": 0.9, "confidence": True}, "gate.confidence: expected a"),
    ("confidence 1", {"min_retention": 0.9, "confidence": 1}, "gate.confidence: Input should be"),
    ("confidence 0.2", {"min_retention": 0.9, "confidence": 0.2}, "gate.confidence: Input should"),
    ("strict word", {"min_retention": 0.9, "confidence": 0.95, "strict": "yes"}, "gate.strict:"),
    ("strict alone", {"min_retention": 0.9, "strict": True}, "give confidence too"),
    ("allow 1", {"min_retention": 0.9, "allow_no_compression": 1}, "gate.allow_no_compression:"),
]


@pytest.mark.parametrize(("gate", "expected"), [c[1:] for c in GATES], ids=[c[0] for c in GATES])
def test_a_gate_setting_the_recipe_cannot_mean_is_one_line(
    gate: dict[str, Any], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe(gate=gate))
    code, err = run(["apply", str(path), "-o", str(tmp_path / "out"), "--dry-run"], capsys)
    assert code == EXIT_USER and expected in _one_error_line(err)
