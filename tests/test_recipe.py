"""Malformed recipes: each gives exactly one line naming the bad field and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from knowpress.core.errors import RecipeError
from knowpress.pipeline.recipe import apply_overrides, load_recipe, validate_recipe


def base(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "version": 1,
        "model": {"path": "./some-model"},
        "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}}],
        "evaluate": {"tasks": ["recall", "perplexity"]},
        "gate": {"min_retention": 0.9},
    }
    recipe.update(changes)
    return recipe


def stage(**method: Any) -> list[dict[str, Any]]:
    return [{"kind": "quantize", "method": {"name": "rtn", **method}}]


MALFORMED: list[tuple[str, Any, str]] = [
    ("not a mapping", [1, 2], "<recipe>: expected a mapping, got list"),
    (
        "version missing",
        {k: v for k, v in base().items() if k != "version"},
        "version: required field is missing",
    ),
    ("version 2", base(version=2), "version: Input should be 1 (got 2)"),
    (
        "model missing",
        {k: v for k, v in base().items() if k != "model"},
        "model: required field is missing",
    ),
    (
        "both world and path",
        base(model={"path": "x", "world": "bios-dense-tiny"}),
        "model: give exactly one of 'world' (a built-in preset) or 'path'",
    ),
    (
        "unknown world",
        base(model={"world": "bios-dense-tinny"}),
        "model.world: unknown world preset 'bios-dense-tinny'; did you mean 'bios-dense-tiny'",
    ),
    ("unknown top-level field", base(stagez=[]), "stagez: unknown field; remove it"),
    (
        "unknown stage kind",
        base(stages=[{"kind": "quantise"}]),
        "stages.0.kind: unknown stage kind 'quantise'; did you mean 'quantize'? (valid:",
    ),
    (
        "stage without kind",
        base(stages=[{"method": {"name": "rtn"}}]),
        "stages.0: missing 'kind' (every entry needs one)",
    ),
    (
        "unknown method",
        base(stages=[{"kind": "quantize", "method": {"name": "rtm"}}]),
        "stages.0.method.name: unknown method 'rtm'; did you mean 'rtn'? (valid: gptq, rtn)",
    ),
    (
        "bits 5",
        base(stages=stage(bits=5)),
        "stages.0.method.bits: Input should be 2, 3, 4 or 8 (got 5)",
    ),
    (
        "group_size 0",
        base(stages=stage(group_size=0)),
        "stages.0.method.group_size: Input should be greater than 0",
    ),
    (
        "misspelled method field",
        base(stages=stage(bitz=4)),
        "stages.0.method.bitz: unknown field; remove it or check its spelling",
    ),
    (
        "method missing",
        base(stages=[{"kind": "quantize"}]),
        "stages.0.method: required field is missing",
    ),
    (
        "stages not a list",
        base(stages={"kind": "quantize"}),
        "stages: Input should be a valid list",
    ),
    (
        "unknown task",
        base(evaluate={"tasks": ["recal"]}),
        "evaluate.tasks: unknown eval task 'recal'; did you mean 'recall'?",
    ),
    ("no tasks", base(evaluate={"tasks": []}), "evaluate.tasks: List should have at least 1 item"),
    (
        "gate floor 0",
        base(gate={"min_retention": 0}),
        "gate.min_retention: Input should be greater than 0",
    ),
    (
        "gate task not evaluated",
        base(evaluate={"tasks": ["recall"]}, gate={"min_retention": 0.9, "tasks": ["perplexity"]}),
        "<recipe>: gate.tasks ['perplexity'] are not evaluated; add them to evaluate.tasks",
    ),
    (
        "teacher string",
        base(teacher="bigger"),
        "teacher: expected 'same' or a mapping like {world: NAME} or {path: DIR}",
    ),
    (
        "reference string",
        base(reference="bigger"),
        "reference: expected 'same' or a mapping like {world: NAME} or {path: DIR}",
    ),
    (
        "device",
        base(device="gpu"),
        "device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N",
    ),
    (
        "compute dtype",
        base(model={"path": "x", "compute_dtype": "int8"}),
        "model.compute_dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' "
        "(got 'int8')",
    ),
    (
        "dtype",
        base(model={"path": "x", "dtype": "float8"}),
        "model.dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'float8')",
    ),
    (
        "max_items negative",
        base(evaluate={"max_items": -5}),
        "evaluate.max_items: Input should be greater than 0",
    ),
]


@pytest.mark.parametrize(("label", "data", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_gives_one_line(label: str, data: Any, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    message = str(info.value)
    assert len(info.value.lines) == 1, message
    assert "\n" not in message
    assert message.startswith(expected), message


def test_valid_recipe_round_trips() -> None:
    recipe = validate_recipe(base())
    again = validate_recipe(recipe.dump())
    assert again == recipe
    assert recipe.stages[0].method.bits == 4  # type: ignore[attr-defined]
    assert recipe.teacher is None  # 'same'


def test_teacher_same_is_default() -> None:
    assert validate_recipe(base(teacher="same")).teacher is None


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nmodel: {path: x\nstages: []\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(info.value.lines) == 1
    assert "not valid YAML at line" in str(info.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="the file is empty"):
        load_recipe(empty)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("version: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    recipe = load_recipe(path, ["stages.0.method.bits=8", "gate.min_retention=0.5"])
    assert recipe.stages[0].method.bits == 8  # type: ignore[attr-defined]
    assert recipe.gate is not None and recipe.gate.min_retention == 0.5
    with pytest.raises(RecipeError, match=r"stages\.0\.method\.bits: Input should be 2, 3, 4 or 8"):
        load_recipe(path, ["stages.0.method.bits=5"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.3.method.bits=4", "stages.3 is not an index of a 1-item list"),
        ("version", "expected KEY=VALUE"),
        ("version.x=1", "version.x goes inside a value that is not a map"),
    ],
)
def test_bad_overrides(override: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        apply_overrides(base(), [override])


def test_stage_hash_depends_on_config_input_and_run_key() -> None:
    a = validate_recipe(base())
    b = validate_recipe(base(stages=stage(bits=8, group_size=32)))
    assert a.stage_hash(0, "x", "k") != b.stage_hash(0, "x", "k")
    assert a.stage_hash(0, "x", "k") != a.stage_hash(0, "y", "k")
    assert a.stage_hash(0, "x", "k") != a.stage_hash(0, "x", "other teacher")
    assert a.stage_hash(0, "x", "k") == validate_recipe(base()).stage_hash(0, "x", "k")
