"""The one loop: for each stage -> run, checkpoint, evaluate, record; then report and gate.

Layout of an output folder (taken, locked and cleared by ``outdir.OutputFolder``)::

    OUT/knowpress_run.json          marks a knowpress run (what --force may replace)
    OUT/.knowpress.lock             flock held while a run writes
    OUT/recipe.yaml                 resolved recipe (what actually ran)
    OUT/reference/eval.json         reference scores and sizes, keyed by its identity + eval
    OUT/stages/01-quantize/         artifact (HF dir, safetensors) + knowpress_artifact.json
                                    + knowpress_stage.json (the record) + eval.json
    OUT/report.json | report.md | retention_vs_size.png

A stage runs inside its output folder's temporary sibling (``ctx.stage_dir``): the model is
saved there in the deploy dtype, the manifest is written last, and the folder is renamed
into place only when all of it succeeded. Every model is scored through ``load_runtime`` on
what was written to disk. Nothing is written before ``_prepare`` has checked what can fail
without weights (``preflight``). ``resume=True`` skips stages whose hash (config chained onto the
input's hash and the run key: teacher, ``data``, knowpress version, deploy dtype, shard
size) matches the record and whose payload files (every shard) are as the manifest recorded;
a stage whose checkpoint exists but whose evaluation does not is only re-evaluated.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from knowpress.core.device import resolve_device
from knowpress.core.errors import KnowpressError
from knowpress.core.io import atomic_dir, atomic_write_text
from knowpress.core.measure import PeakMemory, release_memory, stable_hash
from knowpress.core.progress import Progress
from knowpress.evaluate.evaluator import Measurement
from knowpress.formats.io import format_reason, load_model, save_model
from knowpress.formats.manifest import build_manifest, changed_files, read_manifest, write_manifest
from knowpress.pipeline.context import Context, StageRecord
from knowpress.pipeline.execution import EVAL_FILE, Evaluation, read_json, resolve_recipe
from knowpress.pipeline.launch import Group, launched_world
from knowpress.pipeline.outdir import OutputFolder, resume_dir, stage_dir
from knowpress.pipeline.preflight import (
    attached_policies,
    check_folders,
    check_inputs,
    check_stages,
    check_tasks,
    run_inputs,
    run_world,
    structure_model,
)
from knowpress.pipeline.recipe import Recipe
from knowpress.pipeline.report import build_report, knowpress_version, write_report
from knowpress.pipeline.sources import WORLD_FILE, Source, resolve_source
from knowpress.runtimes.loader import expert_skip_of, kv_policy_of
from knowpress.runtimes.torch import Runtime, TorchRuntime

STAGE_FILE = "knowpress_stage.json"


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def gate_passed(self) -> bool | None:
        gate = self.report.get("gate")
        return None if gate is None else bool(gate["passed"])


class Runner:
    def __init__(
        self, recipe: Recipe, out_dir: Path, *, resume: bool, force: bool, progress: Progress,
        group: Group | None = None,
    ) -> None:  # fmt: skip
        asked = recipe.model.compute_dtype
        self.out_dir, self.progress = Path(out_dir), progress
        self.group = group  # the launched processes that join data-parallel stages
        self.resume, self.force = resume, force
        self.device = resolve_device(recipe.device)  # before anything is written
        self.recipe = recipe = resolve_recipe(recipe, self.device)  # compute_dtype: auto
        self.evaluation = Evaluation(recipe, self.device, asked, progress)  # + reference states
        self.deploy_dtype = recipe.model.dtype
        self.teacher_src: Source | None = None  # resolved in run()
        self._teacher: Any = None  # loaded once, for the stages that need it

    def _runtime(self, location: str) -> Runtime:
        return self.evaluation.load(location)  # compute dtype, batch size, offload

    def run(self) -> RunResult:
        inputs = run_inputs(self.recipe)  # OUT may not overlap what the run reads
        with OutputFolder(self.out_dir, resume=self.resume, force=self.force,
                          inputs=inputs) as folder:  # fmt: skip
            sources, world = self.prepare()
            folder.first_write(knowpress_version())  # a forced run replaces the old one here
            text = yaml.safe_dump(self.recipe.dump(), sort_keys=False)
            atomic_write_text(self.out_dir / "recipe.yaml", text)
            return self._execute(sources, world)

    def prepare(self) -> tuple[dict[str, Source], Any]:
        """Resolve the sources and the world and check all that can fail before any write."""
        recipe, show = self.recipe, self.progress.enabled
        model_src = resolve_source(recipe.model, progress=show)
        reference_src = model_src
        if recipe.reference is not None:
            reference_src = resolve_source(recipe.reference, progress=show, field="reference.path")
        self.teacher_src = reference_src
        if recipe.teacher is not None:
            self.teacher_src = resolve_source(recipe.teacher, progress=show, field="teacher.path")
        sources = {"model": model_src, "reference": reference_src, "teacher": self.teacher_src}
        check_folders(sources)
        world = run_world(recipe, [source.local_dir for source in sources.values()])
        check_tasks(world, recipe.evaluate.tasks)
        check_inputs(recipe, sources, world)
        check_stages(recipe, structure_model(recipe.model, model_src.location),
                     attached_policies(model_src.location))  # fmt: skip
        return sources, world

    def _execute(self, sources: dict[str, Source], world: Any) -> RunResult:
        recipe = self.recipe
        model_src, reference_src = sources["model"], sources["reference"]
        assert self.teacher_src is not None
        version = knowpress_version()
        self.eval_key = stable_hash(
            [recipe.evaluate.model_dump(mode="json"), reference_src.key, version]
        )
        run_key = stable_hash([self.teacher_src.key, recipe.data.model_dump(mode="json"), version,
                               self.deploy_dtype, recipe.model.max_shard_size])  # fmt: skip
        reference, reference_bf16 = self.evaluation.reference(
            reference_src, world, self.out_dir / "reference", self.eval_key, self.resume
        )  # released before any stage; its states are what later rows compare with

        stages: list[tuple[StageRecord, Measurement]] = []
        history: list[StageRecord] = []
        input_hash, input_dir = model_src.key, model_src.location
        input_bytes = model_src.stored_bytes()
        loaded: Runtime | None = None  # the runtime of input_dir, when it was just scored
        dirty = False  # True once a stage is re-run: every later checkpoint is stale
        for index, config in enumerate(recipe.stages):
            digest = recipe.stage_hash(index, input_hash, run_key)
            target = stage_dir(self.out_dir, index, config.kind)
            record = self._finished(target, digest) if (self.resume and not dirty) else None
            if record is None:
                dirty = True
                if type(config).blockwise:  # held as stored instead (pipeline/blockwise.py)
                    loaded = None
                release_memory()  # what the last runtime freed, back to the OS
                ctx = self.context(input_dir, world, history, loaded, type(config).blockwise)
                record = self._run_stage(ctx, index, digest, target, input_dir, input_bytes)
                del ctx
            else:
                self.progress.log(f"[green]✓[/green] stage {index + 1} ({config.kind}) resumed")
            loaded = None
            if not any(type(later).needs_teacher for later in recipe.stages[index + 1 :]):
                self._teacher = None  # no later stage learns from it
            gc.collect()
            measurement, loaded = self._stage_measurement(target, world, index, config.kind)
            history.append(record)
            stages.append((record, measurement))
            input_hash, input_dir, input_bytes = digest, str(target), record.bytes_after

        report = build_report(
            recipe=recipe,
            inputs={name: source.location for name, source in sources.items()},
            world=world,
            reference=reference,
            reference_bf16_bytes=reference_bf16,
            stages=stages,
            execution=self.evaluation.execution(),
        )
        write_report(report, self.out_dir)
        return RunResult(self.out_dir, report)

    def context(
        self, location: str, world: Any, history: list[StageRecord], loaded: Runtime | None,
        blockwise: bool = False,
    ) -> Context:  # fmt: skip
        """The context a stage starts from: the model stored at ``location`` (reusing the
        runtime that just scored it), with the policies and structure its manifest records.
        A block-wise stage gets the model as stored, on the CPU (``pipeline/blockwise.py``)."""
        spec = self.recipe.model
        if blockwise:
            from knowpress.pipeline.blockwise import stored_dtype

            model, tokenizer = load_model(
                location,
                dtype=stored_dtype(location, spec.compute_dtype),
                trust_remote_code=spec.trust_remote_code,
                device="cpu",
            )
        elif isinstance(loaded, TorchRuntime):
            model, tokenizer = loaded.model, loaded.tokenizer
            if loaded.expert_skip is not None:  # stages see the plain model; ctx carries it
                from knowpress.methods.experts.skip import detach

                detach(model)
        else:
            model, tokenizer = load_model(
                location,
                dtype=spec.compute_dtype,
                trust_remote_code=spec.trust_remote_code,
                device=self.device,
            )
        manifest = read_manifest(Path(location)) if Path(location).is_dir() else None
        return Context.for_recipe(
            self.recipe,
            model,
            tokenizer,
            self.out_dir,
            world=world,
            device=self.device,
            kv_policy=kv_policy_of(manifest, location),
            expert_skip=expert_skip_of(manifest, location),
            structure=dict(manifest.structure) if manifest else {},
            history=list(history),
        )

    def teacher(self) -> Any:
        """The teacher model, loaded on first use and kept for later stages (loaded again
        after a distill stage sharded it under FSDP: its forwards need every process)."""
        from knowpress.methods.distill.fsdp import is_sharded

        if self._teacher is None or is_sharded(self._teacher):
            assert self.teacher_src is not None  # prepare() resolves it before any stage
            self._teacher, _ = self.teacher_src.load(self.device)
        return self._teacher

    def _finished(self, target: Path, digest: str) -> StageRecord | None:
        data = read_json(target / STAGE_FILE)
        if not data or data.get("hash") != digest:
            return None
        manifest = read_manifest(target)
        problems = ["no manifest"] if manifest is None else changed_files(target, manifest)
        if problems:
            self.progress.log(f"[yellow]{target.name}: {problems[0]}; re-running it[/yellow]")
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
        if config.loads_teacher():
            ctx.teacher = self.teacher()
        resume = resume_dir(target, digest)
        together = self.group is not None and type(config).data_parallel
        with atomic_dir(target) as tmp:
            ctx.begin_stage(tmp, resume)
            start = time.perf_counter()
            stage = config.build()
            with (
                PeakMemory() as memory,
                (
                    self.group.stage(index, input_dir, resume) if together else nullcontext()  # type: ignore[union-attr]
                ),
            ):
                try:
                    ctx = stage.run(ctx, self.progress)
                except KnowpressError as exc:
                    raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None
            seconds = time.perf_counter() - start
            save = getattr(stage, "save", None)  # a stage writing its own artifact (export)
            dtype = _torch_dtype(self.deploy_dtype)
            if callable(save):
                fmt = save(ctx, tmp)
            else:
                fmt = save_model(
                    ctx.model, ctx.tokenizer, tmp, dtype=dtype, max_shard_size=ctx.max_shard_size
                )
            verify = getattr(stage, "verify", None)
            if callable(verify):  # the stage checks what was written, before it is installed
                try:
                    verify(ctx, tmp)
                except KnowpressError as exc:
                    raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None
            world_file = Path(input_dir) / WORLD_FILE
            if world_file.is_file():  # lets `compress eval --model` find the world later
                shutil.copyfile(world_file, tmp / WORLD_FILE)
            manifest = build_manifest(
                tmp,
                format=fmt,
                dtype=self.deploy_dtype,
                artifacts=ctx.artifacts,
                runtime=_runtime_policies(ctx),
                structure=ctx.structure,
                format_reason=format_reason(ctx.model) if fmt == "hf-packed" else None,
            )
            write_manifest(tmp, manifest)
            record = StageRecord(
                index=index,
                kind=config.kind,
                config=config.model_dump(mode="json"),
                hash=digest,
                seconds=round(seconds, 3),
                peak_rss_bytes=memory.peak,
                bytes_before=input_bytes,
                bytes_after=manifest.stored_bytes,
                checkpoint=str(target.relative_to(self.out_dir)),
                details=dict(ctx.metrics),
                device=str(self.device),
                format=fmt,
            )
            atomic_write_text(tmp / STAGE_FILE, json.dumps(dataclasses.asdict(record), indent=1))
        shutil.rmtree(resume, ignore_errors=True)  # installed: its mid-stage state is spent
        return record

    def _stage_measurement(
        self, target: Path, world: Any, index: int, kind: str
    ) -> tuple[Measurement, Runtime | None]:
        """The stage's cached measurement, or a fresh one (and the runtime that made it)."""
        cached = read_json(target / EVAL_FILE)
        if cached and cached.get("key") == self.eval_key:
            return Measurement.from_json(cached["measurement"]), None
        manifest = read_manifest(target)
        assert manifest is not None  # _finished / _run_stage guarantee it
        runtime = self._runtime(str(target))
        label = f"stage {index + 1} ({kind})"
        measurement = self.evaluation.measure(runtime, world, label, manifest.stored_bytes)
        payload = {"key": self.eval_key, "measurement": measurement.to_json()}
        atomic_write_text(target / EVAL_FILE, json.dumps(payload, indent=1))
        offloaded = self.recipe.evaluate.offload  # a dispatched model is not a stage's input
        return measurement, None if offloaded else runtime


def _runtime_policies(ctx: Context) -> dict[str, dict[str, Any]]:
    """The manifest's ``runtime`` section: the policies attached so far, by slot."""
    policies = {"kv_policy": ctx.kv_policy, "expert_skip": ctx.expert_skip}
    return {slot: p.model_dump(mode="json") for slot, p in policies.items() if p is not None}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def apply(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    group: Group | None = None,
) -> RunResult:
    """Run a validated recipe into ``out_dir``; see the module docstring for the layout."""
    if resume and force:
        raise KnowpressError("--resume and --force contradict each other; pass one")
    if launched_world() > 1 and group is None:  # accelerate launch / torchrun
        raise KnowpressError(
            f"this is one of {launched_world()} launched processes: run them through "
            "`accelerate launch -m knowpress.cli apply`, which joins them "
            "(knowpress/pipeline/launch.py)"
        )
    progress = progress or Progress(enabled=False)
    runner = Runner(recipe, Path(out_dir), resume=resume, force=force, progress=progress,
                    group=group)  # fmt: skip
    with progress.session():
        return runner.run()
