"""``compress eval``: score any model folder (or hub id) on a world's tasks and/or a text,
optionally against a reference (kl, flips) and with lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from knowpress.core.errors import KnowpressError, short


def cmd_eval(args: argparse.Namespace) -> int:
    from knowpress.cli.app import err, out
    from knowpress.cli.quiet import hide_library_output
    from knowpress.core.device import resolve_compute_dtype, resolve_device
    from knowpress.core.io import atomic_write_text
    from knowpress.core.progress import Progress
    from knowpress.core.specs import ModelSpec
    from knowpress.evaluate.evaluator import evaluate_runtime, measure
    from knowpress.evaluate.lm_eval_bridge import run_lm_eval
    from knowpress.pipeline.preflight import check_artifact
    from knowpress.pipeline.sources import resolve_source
    from knowpress.runtimes.loader import load_runtime

    hide_library_output()
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks and not args.lm_eval:
        raise KnowpressError("--tasks is empty and no --lm-eval tasks: nothing to evaluate")
    harness = _harness(args)
    if args.json and Path(args.json).is_dir():
        raise KnowpressError(f"--json: {args.json} is a folder; give the path of a file to write")
    spec = ModelSpec(path=args.model, trust_remote_code=args.trust_remote_code)
    source = resolve_source(spec, field="--model")
    check_artifact(Path(source.location), "--model")
    world = _eval_world(args, tasks) if tasks else None
    target = resolve_device(args.device, "--device")
    options = {"device": str(target), "batch_size": args.batch_size,
               "dtype": resolve_compute_dtype("auto", target),  # bf16 on cuda, fp32 on cpu
               "trust_remote_code": args.trust_remote_code}  # fmt: skip
    progress = Progress(console=err, enabled=not args.quiet)
    with progress.session():
        states = _reference_states(args, world, tasks, options, progress)
        runtime = load_runtime(source.location, **options)
        scores = evaluate_runtime(runtime, world, tasks, args.max_items, progress, states)
    if harness is not None:
        scores.update(run_lm_eval(runtime, harness))
    measurement = measure(runtime, scores, source.stored_bytes())
    size = _size_line(measurement)  # before printing: all or nothing
    table = Table(title=f"{args.model}")
    for col in ("task", "metric", "score", "items"):
        table.add_column(col)
    for s in scores.values():
        table.add_row(s.task, s.metric, f"{s.score:.4f}", str(s.n))
    out.print(table)
    out.print(size)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(measurement.to_json(), indent=1))
    return 0


def _harness(args: argparse.Namespace) -> Any:
    """The --lm-eval tasks as a validated spec, checked against the harness's task index
    before any model loads (None without --lm-eval)."""
    from pydantic import ValidationError

    from knowpress.cli.app import err
    from knowpress.evaluate.lm_eval_bridge import LmEvalSpec, check_harness_tasks

    if not args.lm_eval:
        return None
    try:
        harness = LmEvalSpec(
            tasks=[t for t in args.lm_eval.split(",") if t],
            include_path=args.lm_eval_include,
            limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        flags = {"limit": "--lm-eval-limit", "num_fewshot": "--lm-eval-fewshot",
                 "include_path": "--lm-eval-include"}  # fmt: skip
        flag = flags.get(str(first["loc"][0]), "--lm-eval")
        raise KnowpressError(f"{flag}: {first['msg']}") from None
    note = check_harness_tasks(harness)
    if note:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    return harness


def _eval_world(args: argparse.Namespace, tasks: list[str]) -> Any:
    """The world ``compress eval`` scores on: --world or the model's own, with --text as its
    held-out text (or alone, for text-only tasks)."""
    from knowpress.evaluate.tasks import TASKS
    from knowpress.evaluate.text import TextSpec, TextWorld, WithText, load_texts
    from knowpress.pipeline.preflight import check_tasks
    from knowpress.worlds import load_world
    from knowpress.worlds.store import WORLD_FILE

    text = TextWorld(*load_texts(TextSpec(path=args.text), "--text")) if args.text else None
    has_world = args.world or (Path(args.model) / WORLD_FILE).is_file()
    needs_facts = any(TASKS.get(t).needs_facts for t in tasks)
    if not has_world and (text is None or needs_facts):
        raise KnowpressError(
            f"--model {short(args.model, 80)}: it has no fact world ({WORLD_FILE}) for "
            f"{', '.join(tasks)}; score it on your own text: --text FILE --tasks kl --reference "
            f"ORIGINAL (kl compares with the model it came from; --tasks perplexity needs "
            f"none), or name a world with --world"
        )
    if text is not None and not (has_world and needs_facts):
        world = text
    else:
        world = load_world(args.world or Path(args.model))
        world = world if text is None else WithText(world, text)
    check_tasks(world, tasks)
    return world


def _reference_states(
    args: argparse.Namespace, world: Any, tasks: list[str], options: dict[str, Any],
    progress: Any,
) -> dict[str, Any] | None:  # fmt: skip
    """With --reference, what the model is compared against (kl, flips); kl needs it."""
    from knowpress.evaluate.evaluator import evaluate_reference
    from knowpress.evaluate.tasks import TASKS
    from knowpress.runtimes.loader import load_runtime

    if args.reference is None:
        absolute = [t for t in tasks if not TASKS.get(t).relative]
        if absolute:
            raise KnowpressError(
                f"--tasks: {absolute[0]} compares with a reference model; pass --reference DIR"
            )
        return None
    from knowpress.pipeline.preflight import check_artifact

    check_artifact(Path(args.reference), "--reference")
    reference = load_runtime(args.reference, **options)
    _, states = evaluate_reference(reference, world, tasks, args.max_items, progress)
    del reference
    return states


def _size_line(m: Any) -> str:
    """Stored bytes (the manifest's payload: safetensors, or an ONNX bundle's graph and
    data) against the model's own logical parameters at 2 bytes each (bf16; packed weights
    count unpacked, so an int4 folder reads about 0.27 and a float32 one 2.0), bits per
    parameter, KV bytes per token."""
    from knowpress.formats.sizes import bits_per_parameter

    policy = m.runtime.get("kv_policy") or "full cache"
    return (
        f"stored {m.stored_bytes:,} bytes = {m.stored_bytes / (2 * m.parameters):.3f} x its "
        f"{m.parameters:,} parameters in bf16 (2 bytes each), "
        f"{bits_per_parameter(m.stored_bytes, m.parameters):.2f} bits/param, KV "
        f"{m.kv_bytes_per_token:.0f} bytes/token ({policy}); measured with "
        f"{m.runtime['runtime']} on {m.runtime['device']} in {m.runtime['dtype']}"
    )
