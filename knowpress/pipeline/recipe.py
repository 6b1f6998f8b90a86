"""Recipes: validated YAML that says what to compress, how, and what must survive.

```yaml
version: 1
model: {world: bios-dense-tiny}      # or {path: ./my-model} (a local dir or a hub id)
reference: same                      # retention is measured against this (default: the model)
teacher: same                        # what distillation learns from (default: the reference)
device: auto                         # auto | cpu | cuda | cuda:N
stages:
  - kind: quantize
    method: {name: rtn, bits: 4, group_size: 32}
evaluate: {tasks: [recall, perplexity]}
gate: {min_retention: 0.95}
```

Every model is pydantic v2 with ``extra="forbid"``. Stage configs are discriminated by
``kind`` over the :data:`~knowpress.pipeline.stage.STAGES` registry, methods by ``name`` over their
family registry. Validation errors become one line per bad field: the dotted path, what is
wrong, and what is allowed (closest names for unknown kinds and methods).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from knowpress.core.errors import KnowpressError, RecipeError, short, yaml_value
from knowpress.core.registry import Registry, close_matches
from knowpress.core.specs import DataSpec, ModelSpec, Strict
from knowpress.core.yaml_text import load_yaml
from knowpress.evaluate.lm_eval_bridge import LmEvalSpec, report_name
from knowpress.evaluate.text import TextSpec
from knowpress.pipeline.stage import STAGES, StageConfig


def _lookup(registry: Registry[Any], name: str) -> None:
    """Registry lookup inside a validator: pydantic only turns ValueError into a field error."""
    try:
        registry.get(name)
    except KnowpressError as exc:
        raise ValueError(str(exc)) from None


class RecipeModelSpec(ModelSpec):
    """A recipe's model, reference or teacher: a ``world`` must name a preset."""

    @field_validator("world")
    @classmethod
    def _known_world(cls, value: str | None) -> str | None:
        if value is not None:
            from knowpress.worlds import PRESETS

            _lookup(PRESETS, value)
        return value


class EvaluateSpec(Strict):
    """Tasks scored on the teacher and after every stage, on the same items."""

    tasks: list[str] = Field(default_factory=lambda: ["recall", "perplexity"], min_length=1)
    world: str | None = Field(None, description="fact world; default: the model's own")
    max_items: int | None = Field(None, gt=0, description="cap items per task (speed)")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="sequences per forward; auto: probed once on cuda, from memory on cpu"
    )
    offload: bool = Field(False, description="device_map auto: a model larger than the device")
    lm_eval: LmEvalSpec | None = Field(None, description="lm-evaluation-harness tasks too")
    text: TextSpec | None = Field(None, description="held-out text for kl / perplexity")

    def task_names(self) -> list[str]:
        """Every report task: the world tasks, then ``lm_eval/<task>`` for harness tasks."""
        harness = [report_name(t) for t in self.lm_eval.tasks] if self.lm_eval else []
        return [*self.tasks, *harness]

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError(
            f"{yaml_value(value)} is not a batch size; give a whole number >= 1 or auto"
        )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from knowpress.evaluate.tasks import TASKS

        for name in tasks:
            _lookup(TASKS, name)
        if len(set(tasks)) != len(tasks):
            raise ValueError("each task may be listed once")
        return tasks


class GateSpec(Strict):
    """Fail the run (exit 1) when any gated task's retention falls below the floor, or the
    ``kl`` task's mean KL exceeds ``max_kl`` or its top-1 agreement is under ``min_top1``.
    With ``confidence`` the bounds apply to intervals at that level (fail when the upper bound
    is below the floor; ``strict``: when the lower bound is; ``evaluate/gate.py``). A stage
    that does not compress fails the gate unless ``allow_no_compression``."""

    min_retention: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_kl: float | None = Field(None, gt=0, allow_inf_nan=False, description="nats/token")
    min_top1: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    tasks: list[str] | None = Field(None, description="default: every evaluated task")
    confidence: float | None = Field(
        None, ge=0.5, lt=1, allow_inf_nan=False, description="gate on intervals at this level"
    )
    strict: bool = Field(False, description="fail unless the interval's lower bound holds")
    allow_no_compression: bool = Field(
        False, description="let stages that grow the model or change nothing pass"
    )

    @model_validator(mode="after")
    def _some_bound(self) -> GateSpec:
        if self.min_retention is None and self.max_kl is None and self.min_top1 is None:
            raise ValueError("give min_retention, max_kl or min_top1 (a gate must bound something)")
        if self.strict and self.confidence is None:
            raise ValueError("strict tests an interval's lower bound: give confidence too (0.95)")
        return self


class Recipe(Strict):
    version: Literal[1]
    model: RecipeModelSpec
    reference: RecipeModelSpec | None = Field(None, description="'same' (default): the input model")
    teacher: RecipeModelSpec | None = Field(None, description="'same' (default): the reference")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    data: DataSpec = DataSpec()
    stages: list[SerializeAsAny[StageConfig]] = Field(default_factory=list)
    evaluate: EvaluateSpec = EvaluateSpec()
    gate: GateSpec | None = None

    @field_validator("reference", "teacher", mode="before")
    @classmethod
    def _same(cls, value: Any) -> Any:
        if value == "same":
            return None
        if isinstance(value, str):
            raise ValueError("expected 'same' or a mapping like {world: NAME} or {path: DIR}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
            raise ValueError(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _gate_tasks_evaluated(self) -> Recipe:
        if self.gate and not self.stages:
            raise ValueError(
                "gate: the recipe has no stages, so the gate would compare the reference with "
                "itself; add a stage or remove the gate"
            )
        kl_bounds = self.gate and (self.gate.max_kl is not None or self.gate.min_top1 is not None)
        if kl_bounds and "kl" not in self.evaluate.tasks:
            raise ValueError(
                "gate.max_kl / gate.min_top1 bound the kl task: add kl to evaluate.tasks"
            )
        if self.gate and self.gate.tasks:
            evaluated = self.evaluate.task_names()
            missing = [t for t in self.gate.tasks if t not in evaluated]
            if missing:
                raise ValueError(
                    f"gate.tasks {missing} are not evaluated; add them to evaluate.tasks "
                    f"(or evaluate.lm_eval.tasks) or drop them (evaluated: {evaluated})"
                )
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def stage_hash(self, index: int, input_hash: str, run_key: str) -> str:
        """Hash of a stage's resolved config chained onto the hash of its input and the
        ``run_key`` (teacher identity, ``data`` spec, knowpress version, deploy dtype)."""
        config = self.stages[index].model_dump(mode="json")
        blob = json.dumps([input_hash, run_key, config], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


MAX_ERROR_LINES = 10


@functools.cache
def _validator(stage_kinds: tuple[str, ...]) -> type[Recipe]:
    classes = tuple(STAGES.get(kind) for kind in stage_kinds)
    union = Annotated[Union[classes], Field(discriminator="kind")]  # noqa: UP007
    return create_model("Recipe", __base__=Recipe, stages=(list[union], []))  # type: ignore[call-overload]


def _ensure_registered() -> None:
    import knowpress.pipeline.stages  # noqa: F401  (registers the built-in stage kinds)


def _dotted(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted path of a pydantic error location, walked along the input so that the union
    tags pydantic inserts (``quantize``, ``rtn``) are dropped and real keys kept."""
    parts: list[str] = []
    for key in loc:
        if isinstance(data, list) and isinstance(key, int):
            data = data[key] if 0 <= key < len(data) else None
        elif isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, dict) and key in (data.get("kind"), data.get("name")):
            continue
        elif data is not None and not isinstance(data, dict | list):
            continue  # a union member's tag under a scalar (``int`` of ``int | float``)
        else:
            data = None
        parts.append(short(str(key), 60))
    return ".".join(parts) or "<recipe>"


_EXPECTED = {
    "int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string",
}  # fmt: skip


def _error_line(err: Any, data: Any) -> str:
    path = _dotted(tuple(err["loc"]), data)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "union_tag_invalid":
        field = ctx.get("discriminator", "").strip("'")
        expected = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = short(ctx.get("tag"), 60)
        hint = close_matches(tag, expected)
        did = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        what = "stage kind" if field == "kind" else "method"
        return f"{path}.{field}: unknown {what} {tag!r}{did} (valid: {', '.join(expected)})"
    if kind == "union_tag_not_found":
        field = ctx.get("discriminator", "").strip("'")
        return f"{path}: missing '{field}' (every entry needs one)"
    if kind == "extra_forbidden":
        return f"{path}: unknown field; remove it or check its spelling"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {yaml_value(err.get('input'))}"
    message = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind.startswith("literal_error"):
        got = err.get("input")
        shown = f"{str(got).lower()}, a boolean" if isinstance(got, bool) else short(repr(got))
        return f"{path}: {short(message)} (got {shown})"
    return f"{path}: {short(message)}"


def validate_recipe(data: Any, source: str | None = None) -> Recipe:
    """Validate a recipe dict; raise :class:`RecipeError` with one line per bad field."""
    _ensure_registered()
    if not isinstance(data, dict):
        raise RecipeError([f"<recipe>: expected a mapping, got {type(data).__name__}"], source)
    try:
        return _validator(tuple(STAGES.names())).model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = list(dict.fromkeys(_error_line(e, data) for e in errors[:MAX_ERROR_LINES]))
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"... and {len(errors) - MAX_ERROR_LINES} more problems")
        raise RecipeError(lines, source) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.0.c=VALUE`` overrides (VALUE parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError([f"--set {item!r}: expected KEY=VALUE, e.g. stages.0.method.bits=4"])
        value = load_yaml(raw, f"--set {short(key, 60)}") if raw else None
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(
                        [f"--set {key}: {where} is not an index of a {len(node)}-item list"]
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError([f"--set {key}: {where} goes inside a value that is not a map"])
    return data


MAX_RECIPE_BYTES = 1_000_000


def _recipe_text(path: Path) -> str:
    if not path.exists():
        raise RecipeError([f"recipe file not found: {path} (give the path of a .yaml recipe)"])
    if not path.is_file():
        raise RecipeError([f"{path}: not a regular file (give the path of a .yaml recipe)"])
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError([f"{path}: {path.stat().st_size:,} bytes is not a recipe (over 1 MB)"])
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [f"<recipe>: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"],
            str(path),
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read YAML safely (``yaml_text``), apply ``--set`` overrides, validate."""
    path = Path(path)
    source = str(path)
    text = _recipe_text(path)
    try:
        data = load_yaml(text)
    except RecipeError as exc:
        raise RecipeError(exc.lines, source) from None
    if data is None:
        raise RecipeError(["<recipe>: the file is empty; start with 'version: 1'"], source)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return validate_recipe(data, source)
