"""lm-evaluation-harness tasks on any stage's model, scored into the same report.

``evaluate.lm_eval`` in a recipe (or ``compress eval --lm-eval``) names harness tasks; each
becomes a report task ``lm_eval/<task>`` whose headline score is the harness's first
reported metric among ``HEADLINE_METRICS`` (``acc_norm`` before ``acc`` ...), all its
metrics kept in ``extra``. Retention is compressed / teacher like every other task.

The runtime's model is handed to the harness in memory (``HFLM(pretrained=model)``), so
packed knowpress checkpoints are scored exactly as they are stored. Runs are offline by default
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set for the call): point ``include_path`` at
task YAMLs whose ``dataset_path``/``dataset_kwargs`` name local files, or at datasets
already in the Hugging Face cache. ``write_fact_task`` writes such a task (multiple choice
over a fact world's trained questions) as a starting point.

The harness is an optional extra: ``pip install 'knowpress[eval]'`` (lm-eval 0.4.x).
Reference: Gao et al., "A framework for few-shot language model evaluation" (2021-),
https://github.com/EleutherAI/lm-evaluation-harness.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError

if TYPE_CHECKING:
    from knowpress.evaluate.evaluator import TaskScore
    from knowpress.worlds import World

PREFIX = "lm_eval/"
HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity", "perplexity")
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}
_INSTALL = "pip install 'knowpress[eval]'"


class LmEvalSpec(FrozenConfig):
    """Harness tasks to score after the teacher and every stage."""

    tasks: list[str] = Field(min_length=1, description="harness task names")
    include_path: str | None = Field(None, description="folder of local task YAMLs")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="documents per task (speed)")
    batch_size: int = Field(8, gt=0)
    offline: bool = Field(True, description="forbid hub downloads during the run")


def report_name(task: str) -> str:
    return f"{PREFIX}{task}"


def _import_harness() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise KnowpressError(
            f"evaluate.lm_eval needs lm-evaluation-harness, which is not importable ({exc}); "
            f"install it with {_INSTALL}, or remove evaluate.lm_eval"
        ) from None
    return lm_eval, HFLM, TaskManager


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Set the hub/datasets offline switches for the call, module constants included
    (``datasets`` reads its environment once, at import)."""
    if not enabled:
        yield
        return
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    patched: list[tuple[Any, str, Any]] = []
    try:
        import datasets.config as dconf
        import huggingface_hub.constants as hconf

        for module, attr in ((dconf, "HF_HUB_OFFLINE"), (dconf, "HF_DATASETS_OFFLINE"),
                             (hconf, "HF_HUB_OFFLINE")):  # fmt: skip
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def headline(metrics: dict[str, Any]) -> tuple[str, float, bool]:
    """``(metric, value, higher_is_better)`` of a harness result row (keys ``"acc,none"``)."""
    plain = {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and "_stderr" not in key and key != "sample_len"
    }
    for name in HEADLINE_METRICS:
        if name in plain:
            return name, plain[name], name not in _LOWER_IS_BETTER
    if not plain:
        raise KnowpressError("lm_eval: the harness reported no numeric metric for a task")
    name = sorted(plain)[0]
    return name, plain[name], name not in _LOWER_IS_BETTER


_MANAGERS: dict[str | None, Any] = {}  # include_path -> the harness's task index (built once)


def _task_manager(spec: LmEvalSpec, task_manager_cls: Any) -> Any:
    """The harness's task index (its built-in tasks plus ``include_path``), built offline
    once per process: indexing its ~15,000 task YAMLs takes seconds."""
    if spec.include_path is not None and not Path(spec.include_path).is_dir():
        raise KnowpressError(
            f"evaluate.lm_eval.include_path: {spec.include_path} is not a directory of task YAMLs"
        )
    if spec.include_path not in _MANAGERS:
        with _offline(spec.offline):
            _MANAGERS[spec.include_path] = task_manager_cls(include_path=spec.include_path)
    return _MANAGERS[spec.include_path]


def _check_known(spec: LmEvalSpec, manager: Any) -> None:
    from knowpress.core.registry import close_matches

    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        where = spec.include_path or "the harness's built-in tasks"
        hint = close_matches(unknown[0], list(manager.all_tasks))
        did = f" (did you mean {' or '.join(repr(h) for h in hint)}?)" if hint else ""
        raise KnowpressError(
            f"evaluate.lm_eval.tasks: {', '.join(unknown)} not found in {where}{did}; check "
            "the name or set evaluate.lm_eval.include_path to a folder with their YAMLs"
        )


def check_harness_tasks(spec: LmEvalSpec) -> str | None:
    """Before the first write and in ``--dry-run``: every task is in the harness's index
    (``KnowpressError`` otherwise). Returns a note, not an error, when the index cannot be
    built here (the tasks are then checked when they run)."""
    _, _, task_manager_cls = _import_harness()
    try:
        manager = _task_manager(spec, task_manager_cls)
    except KnowpressError:
        raise
    except Exception as exc:  # the harness's own indexing failed (offline, a broken YAML)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (
            f"lm_eval tasks not checked: the harness's task index cannot be built here "
            f"({first[:200]}); they are checked when they run"
        )
    _check_known(spec, manager)
    return None


def run_lm_eval(runtime: Any, spec: LmEvalSpec) -> dict[str, TaskScore]:
    """Score ``runtime``'s model on ``spec.tasks``; report names ``lm_eval/<task>``.

    The harness drives a transformers model itself, so this needs a torch runtime (an
    artifact of format ``hf`` or ``hf-packed``); its KV policy, if any, is not applied by the
    harness, which is said in one line instead of scoring something else.
    """
    from knowpress.evaluate.evaluator import TaskScore
    from knowpress.runtimes.torch import TorchRuntime

    lm_eval, hflm, task_manager_cls = _import_harness()
    if not isinstance(runtime, TorchRuntime):
        raise KnowpressError(
            f"evaluate.lm_eval: harness tasks need a PyTorch model; this artifact runs on "
            f"{runtime.name} (score it with world tasks, or drop evaluate.lm_eval)"
        )
    if runtime.kv_policy is not None:
        raise KnowpressError(
            f"evaluate.lm_eval: the harness cannot apply the attached KV policy "
            f"{runtime.kv_policy.name!r}; drop evaluate.lm_eval for this recipe"
        )
    model, tokenizer = runtime.model, runtime.tokenizer
    manager = _task_manager(spec, task_manager_cls)
    _check_known(spec, manager)
    with _offline(spec.offline):
        lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(spec.tasks),
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
            )
        except (ConnectionError, OSError, FileNotFoundError, ValueError) as exc:
            hint = " (offline: the task's data must be local)" if spec.offline else ""
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KnowpressError(
                f"evaluate.lm_eval: the harness could not run {', '.join(spec.tasks)}{hint}: "
                f"{first}"
            ) from None
    if results is None:  # non-zero rank in a distributed run
        return {}
    out: dict[str, TaskScore] = {}
    for task in spec.tasks:
        row = results["results"].get(task)
        if row is None:
            raise KnowpressError(f"lm_eval: the harness returned no result for {task}")
        metric, value, higher = headline(row)
        extra = {
            k.split(",")[0]: float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and "_stderr" not in k and k != "sample_len"
        }
        n = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        name = report_name(task)
        out[name] = TaskScore(name, metric, higher, value, int(n), extra, [])
    return out


def write_fact_task(
    world: World, out_dir: Path, name: str = "knowpress_facts", max_items: int | None = None
) -> Path:
    """Write ``{out_dir}/{name}.yaml`` + ``{name}.jsonl``: 4-way multiple choice over the
    world's trained questions (distractors from the attribute's value pool), metric ``acc``.

    A local, offline harness task: ``include_path: out_dir``, ``tasks: [name]``.
    """
    from knowpress.core.io import atomic_write_text

    out_dir = Path(out_dir)
    rng = random.Random(f"knowpress-lm-eval:{name}")
    items = world.questions("trained")
    if max_items is not None:
        items = items[:max_items]
    rows = []
    for item in items:
        pool = [v for v in world.value_pool(item.attribute) if v != item.answer]
        choices = [item.answer, *rng.sample(pool, min(3, len(pool)))]
        rng.shuffle(choices)
        rows.append(
            {"question": item.prompt, "choices": choices, "label": choices.index(item.answer)}
        )
    data = out_dir / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = out_dir / f"{name}.yaml"
    atomic_write_text(path, json.dumps(config, indent=1) + "\n")  # JSON is valid YAML
    return path
