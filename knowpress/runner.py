"""The one loop: for each stage -> run, checkpoint, evaluate, record; then report and gate.

Layout of an output folder::

    OUT/recipe.yaml                 resolved recipe (what actually ran)
    OUT/teacher/eval.json           teacher scores, keyed by teacher identity + eval settings
    OUT/stages/01-quantize/         HF dir (safetensors) + knowpress_stage.json + eval.json
    OUT/report.json | report.md | retention_vs_size.png

Every write is atomic (temp + rename), so a crash or Ctrl-C leaves each finished stage
usable. ``resume=True`` skips stages whose hash (config chained onto the input's hash)
matches the record on disk; a stage whose checkpoint exists but whose evaluation does not is
only re-evaluated.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from knowpress.context import Context, StageRecord
from knowpress.errors import KnowpressError
from knowpress.evaluate.evaluator import TaskScore, evaluate_runtime
from knowpress.evaluate.lm_eval_bridge import run_lm_eval
from knowpress.evaluate.runtime import TorchRuntime
from knowpress.measure import PeakMemory, stable_hash
from knowpress.models.io import atomic_dir, atomic_write_text, load_model, save_model, stored_bytes
from knowpress.progress import Progress
from knowpress.recipe import Recipe
from knowpress.report import build_report, write_report
from knowpress.sources import WORLD_FILE, Source, resolve_source

STAGE_FILE = "knowpress_stage.json"
EVAL_FILE = "eval.json"


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def gate_passed(self) -> bool | None:
        gate = self.report.get("gate")
        return None if gate is None else bool(gate["passed"])


def stage_dir(out_dir: Path, index: int, kind: str) -> Path:
    return out_dir / "stages" / f"{index + 1:02d}-{kind}"


def _prepare_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KnowpressError(f"output {out_dir} is a file; choose a folder with -o")
    has_content = out_dir.is_dir() and any(out_dir.iterdir())
    if has_content and resume:
        if not (out_dir / "recipe.yaml").is_file():
            raise KnowpressError(f"--resume: {out_dir} is not a knowpress run (no recipe.yaml)")
    elif has_content and force:
        shutil.rmtree(out_dir)
    elif has_content:
        raise KnowpressError(
            f"output folder {out_dir} already exists; pass --resume to continue it or --force "
            f"to overwrite it (or choose another with -o)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "stages").glob(".tmp-*") if (out_dir / "stages").is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def _load_world(recipe: Recipe, model: Source, teacher: Source) -> Any:
    from knowpress.world import load_world

    if recipe.evaluate.world is not None:
        return load_world(recipe.evaluate.world)
    for spec in (recipe.model, recipe.teacher):
        if spec is not None and spec.world is not None:
            return load_world(spec.world)
    for src in (model, teacher):
        if src.local_dir is not None and (src.local_dir / WORLD_FILE).is_file():
            return load_world(src.local_dir)
    raise KnowpressError(
        "evaluate.world: the model is not a knowpress fact-world teacher, so name the world "
        "to measure knowledge on (e.g. evaluate.world: bios-dense-tiny)"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _scores_json(scores: dict[str, TaskScore]) -> dict[str, Any]:
    return {name: s.to_json() for name, s in scores.items()}


def _scores_from(data: dict[str, Any]) -> dict[str, TaskScore]:
    return {name: TaskScore.from_json(v) for name, v in data.items()}


class Runner:
    def __init__(
        self, recipe: Recipe, out_dir: Path, *, resume: bool, force: bool, progress: Progress
    ) -> None:
        self.recipe, self.out_dir, self.progress = recipe, Path(out_dir), progress
        self.resume, self.force = resume, force
        self.eval_key = stable_hash(recipe.evaluate.model_dump(mode="json"))
        self.teacher_src: Source | None = None  # resolved once in run()

    def _evaluate(self, model: Any, tokenizer: Any, world: Any, label: str) -> dict[str, TaskScore]:
        spec = self.recipe.evaluate
        self.progress.log(f"[dim]evaluating {label} on {', '.join(spec.task_names())}[/dim]")
        runtime = TorchRuntime(model, tokenizer, batch_size=spec.batch_size)
        scores = evaluate_runtime(runtime, world, spec.tasks, spec.max_items, self.progress)
        if spec.lm_eval is not None:
            scores.update(run_lm_eval(model, tokenizer, spec.lm_eval))
        return scores

    def _teacher_scores(self, teacher: Source, world: Any) -> tuple[dict[str, TaskScore], int]:
        path = self.out_dir / "teacher" / EVAL_FILE
        key = stable_hash([teacher.key, self.eval_key])
        cached = _read_json(path) if self.resume else None
        if cached and cached.get("key") == key:
            return _scores_from(cached["scores"]), int(cached["stored_bytes"])
        model, tokenizer = teacher.load()
        scores = self._evaluate(model, tokenizer, world, "teacher")
        size = teacher.stored_bytes()
        payload = {
            "key": key,
            "source": teacher.location,
            "stored_bytes": size,
            "scores": _scores_json(scores),
        }
        atomic_write_text(path, json.dumps(payload, indent=1))
        del model
        gc.collect()
        return scores, size

    def run(self) -> RunResult:
        recipe = self.recipe
        _prepare_out_dir(self.out_dir, self.resume, self.force)
        show = self.progress.enabled
        model_src = resolve_source(recipe.model, progress=show)
        teacher_src = (
            model_src if recipe.teacher is None else resolve_source(recipe.teacher, progress=show)
        )
        self.teacher_src = teacher_src  # resolved once; stages that need the teacher load it
        world = _load_world(recipe, model_src, teacher_src)
        atomic_write_text(
            self.out_dir / "recipe.yaml", yaml.safe_dump(recipe.dump(), sort_keys=False)
        )
        teacher_scores, teacher_bytes = self._teacher_scores(teacher_src, world)

        records: list[StageRecord] = []
        evals: list[dict[str, TaskScore]] = []
        input_hash, input_dir = model_src.key, model_src.location
        input_bytes = model_src.stored_bytes()
        ctx: Context | None = None
        dirty = False  # True once a stage is re-run: every later checkpoint is stale
        for index, config in enumerate(recipe.stages):
            digest = recipe.stage_hash(index, input_hash)
            target = stage_dir(self.out_dir, index, config.kind)
            record = self._finished(target, digest) if (self.resume and not dirty) else None
            if record is None:
                dirty = True
                if ctx is None:
                    ctx = self._context(input_dir, world)
                record = self._run_stage(ctx, index, digest, target, input_dir, input_bytes)
                ctx = self._context(str(target), world, previous=ctx)
            else:
                ctx = None  # resumed: load lazily from this checkpoint if a later stage runs
                self.progress.log(f"[green]✓[/green] stage {index + 1} ({config.kind}) resumed")
            scores = self._stage_scores(target, ctx, world, index, config.kind)
            records.append(record)
            evals.append(scores)
            input_hash, input_dir, input_bytes = digest, str(target), record.bytes_after

        report = build_report(
            recipe=recipe,
            model_source=model_src.location,
            teacher_source=teacher_src.location,
            world=world,
            teacher_scores=teacher_scores,
            teacher_bytes=teacher_bytes,
            records=records,
            stage_scores=evals,
        )
        write_report(report, self.out_dir)
        return RunResult(self.out_dir, report)

    def _context(self, location: str, world: Any, previous: Context | None = None) -> Context:
        spec = self.recipe.model
        model, tokenizer = load_model(
            location, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
        )
        ctx = Context(
            recipe=self.recipe, model=model, tokenizer=tokenizer, out_dir=self.out_dir, world=world
        )
        if previous is not None:
            ctx.kv_policy, ctx.teacher = previous.kv_policy, previous.teacher
            ctx.artifacts, ctx.metrics = previous.artifacts, previous.metrics
            ctx.history = previous.history
        return ctx

    def _finished(self, target: Path, digest: str) -> StageRecord | None:
        data = _read_json(target / STAGE_FILE)
        if not data or data.get("hash") != digest:
            return None
        data["resumed"] = True
        return StageRecord(**data)

    def _run_stage(
        self,
        ctx: Context,
        index: int,
        digest: str,
        target: Path,
        input_dir: str,
        input_bytes: int,
    ) -> StageRecord:
        config = self.recipe.stages[index]
        self.progress.log(f"[bold]stage {index + 1}/{len(self.recipe.stages)}: {config.kind}")
        if type(config).needs_teacher and ctx.teacher is None:
            assert self.teacher_src is not None  # run() resolves it before any stage
            ctx.teacher, _ = self.teacher_src.load()
        start = time.perf_counter()
        with PeakMemory() as memory:
            try:
                ctx = config.build().run(ctx, self.progress)
            except KnowpressError as exc:
                raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None
        seconds = time.perf_counter() - start
        with atomic_dir(target) as tmp:
            save_model(ctx.model, ctx.tokenizer, tmp)
            world_file = Path(input_dir) / WORLD_FILE
            if world_file.is_file():  # lets `compress eval --model` find the world later
                shutil.copyfile(world_file, tmp / WORLD_FILE)
            record = StageRecord(
                index=index,
                kind=config.kind,
                config=config.model_dump(mode="json"),
                hash=digest,
                seconds=round(seconds, 3),
                peak_rss_bytes=memory.peak,
                bytes_before=input_bytes,
                bytes_after=stored_bytes(tmp),
                checkpoint=str(target.relative_to(self.out_dir)),
                details=dict(ctx.metrics),
            )
            atomic_write_text(tmp / STAGE_FILE, json.dumps(dataclasses.asdict(record), indent=1))
        ctx.history.append(record)
        return record

    def _stage_scores(
        self, target: Path, ctx: Context | None, world: Any, index: int, kind: str
    ) -> dict[str, TaskScore]:
        cached = _read_json(target / EVAL_FILE)
        if cached and cached.get("key") == self.eval_key:
            return _scores_from(cached["scores"])
        if ctx is None:
            ctx = self._context(str(target), world)
        scores = self._evaluate(ctx.model, ctx.tokenizer, world, f"stage {index + 1} ({kind})")
        payload = {"key": self.eval_key, "scores": _scores_json(scores)}
        atomic_write_text(target / EVAL_FILE, json.dumps(payload, indent=1))
        return scores


def apply(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Run a validated recipe into ``out_dir``; see the module docstring for the layout."""
    if resume and force:
        raise KnowpressError("--resume and --force contradict each other; pass one")
    progress = progress or Progress(enabled=False)
    runner = Runner(recipe, Path(out_dir), resume=resume, force=force, progress=progress)
    with progress.session():
        return runner.run()
