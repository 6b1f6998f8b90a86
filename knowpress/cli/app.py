"""``compress`` (alias ``knowpress``): apply | check | eval | export | world | list.

Exit codes: 0 success, 1 gate failed, 2 user error (bad recipe, missing or corrupt files,
disk full, ...: one line each), 3 internal error (a bug: one line, the traceback with
``--debug``), 130 interrupted (Ctrl-C, or SIGTERM from ``kill``, a cancelled CI job or a
scheduler's timeout).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from knowpress.cli import args as cli_args
from knowpress.cli.check import cmd_check, gate_table
from knowpress.cli.eval import cmd_eval
from knowpress.cli.export import cmd_export
from knowpress.cli.interrupts import terminate_as_interrupt
from knowpress.cli.list import cmd_list
from knowpress.cli.quiet import hide_library_output, quiet_libraries
from knowpress.core.errors import KnowpressError, disk_full, short
from knowpress.evaluate.gate import describe_bounds

EXIT_GATE, EXIT_USER, EXIT_BUG, EXIT_INTERRUPT = 1, cli_args.EXIT_USER, 3, 130
out = Console()
err = Console(stderr=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary(report: dict[str, Any]) -> Table:
    """Retention per task (scores are in report.md; ``kl`` shows its nats/token, being a
    comparison already), sized to fit a terminal; a stage that did not compress is flagged.
    A kl-only run (no relative task) shows kl's top-1 where the worst retention would be."""
    tasks = list(report["tasks"])
    relative = any(info.get("relative", True) for info in report["tasks"].values())
    top1 = "kl" in tasks and not relative
    extra = ["kl top-1"] if top1 else ["worst"]
    table = Table(title="knowledge retained vs bytes stored (retention vs reference)")
    for col in ["model", "MiB", "vs bf16 ref", "bits/param", *tasks, *extra]:
        if col == "model":
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, justify="right", overflow="fold")
    for row in report["rows"]:
        size = row.get("size_vs_bf16_reference", row.get("size_ratio"))
        bits = row.get("bits_per_parameter")
        flag = (row.get("compression") or {}).get("flag")
        name = row["name"] + (f" [yellow]({flag})[/yellow]" if flag else "")
        cells = [name, f"{row['stored_bytes'] / 2**20:.2f}", _fmt(size, 3), _fmt(bits, 2)]
        cells += [
            _fmt(row["retention"][t], 3) if t in row["retention"] else _fmt(row["scores"][t], 4)
            for t in tasks
        ]
        if top1:
            cells.append(_fmt(row["details"]["kl"]["extra"].get("top1"), 3))
        else:
            worst = row["worst_retention"]
            color = "green" if worst is not None and worst >= 0.95 else "yellow"
            cells.append(f"[{color}]{_fmt(worst, 3)}[/{color}]")
        table.add_row(*cells)
    return table


def cmd_apply(args: argparse.Namespace) -> int:
    from knowpress.pipeline.outdir import check_not_input
    from knowpress.pipeline.preflight import run_inputs
    from knowpress.pipeline.recipe import load_recipe

    overrides = [*args.set, *([f"device={args.device}"] if args.device else [])]
    recipe = load_recipe(args.recipe, overrides)
    out_dir = Path(args.output or Path("runs") / Path(args.recipe).stem)
    inputs = run_inputs(recipe)
    if args.force:  # a forced run clears OUT: the recipe read from it would go too
        inputs["the recipe"] = Path(args.recipe)
    check_not_input(out_dir, inputs)
    if args.dry_run:
        _print_plan(recipe, out_dir)
        return 0
    from knowpress.core.progress import Progress
    from knowpress.pipeline.launch import join, launched_world, rank_device
    from knowpress.pipeline.runner import apply

    hide_library_output()
    if launched_world() > 1:  # accelerate launch: each process on its own device
        recipe = load_recipe(args.recipe, [*overrides, f"device={rank_device(recipe.device)}"])
    group = join(recipe)
    if group is not None and group.rank > 0:
        group.follow(recipe, out_dir)  # rank 0 reports
        return 0
    try:
        result = apply(
            recipe,
            out_dir,
            resume=args.resume,
            force=args.force,
            progress=Progress(console=err, enabled=not args.quiet),
            group=group,
        )
    finally:
        if group is not None:
            group.close()
    out.print(_summary(result.report))
    for warning in result.report.get("warnings", []):
        out.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    out.print(f"report: {out_dir / 'report.md'}  plot: {out_dir / 'retention_vs_size.png'}")
    gate = result.report.get("gate")
    if gate is not None and not gate["passed"]:
        out.print(gate_table(gate))
        return EXIT_GATE
    if gate is not None:
        out.print(f"[green]gate passed[/green] ({describe_bounds(gate)})")
    return 0


def _compute(dtype: str) -> str:
    return "auto: bfloat16 on cuda, float32 on cpu" if dtype == "auto" else dtype


def _print_plan(recipe: Any, out_dir: Path) -> None:
    """The dry run: everything that can fail without weights is checked before printing."""
    import yaml

    from knowpress.pipeline.preflight import dry_run

    world, facts, notes = dry_run(recipe)

    def named(spec: Any, default: str) -> str:
        return default if spec is None else (spec.world or spec.path)

    model = (recipe.model.world and f"world preset {recipe.model.world}") or recipe.model.path
    teacher = named(recipe.teacher, "the reference")
    reference = named(recipe.reference, "the model")
    out.print(
        f"[bold]plan[/bold] (dry run: nothing loaded)\n  model:     {model} "
        f"(stored in {recipe.model.dtype}, computed in {_compute(recipe.model.compute_dtype)})\n"
        f"  reference: {reference}\n  teacher:   {teacher}\n  device:    {recipe.device}\n"
        f"  output:    {out_dir}"
    )
    for i, stage in enumerate(recipe.stages):
        body = yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False).strip()
        out.print(f"  stage {i + 1}: " + body.replace("\n", "\n           "))
        for line in facts[i] if facts else []:
            out.print(f"           {line}", highlight=False)
    if facts is None:
        out.print("  stages: not checked against the model's shapes (its config is not local)")
    tasks = recipe.evaluate.task_names()
    out.print(
        f"  evaluate: {', '.join(tasks)} on world {world.config.key()}, after the reference "
        f"and every stage"
    )
    if recipe.gate:
        bounds = describe_bounds(recipe.gate.model_dump())
        out.print(f"  gate: {bounds} on {', '.join(recipe.gate.tasks or tasks)}")
    for note in notes:
        out.print(f"  [yellow]note:[/yellow] {escape(note)}", highlight=False)


def cmd_world(args: argparse.Namespace) -> int:
    from knowpress.teachers import build_teacher
    from knowpress.worlds import PRESETS

    if args.world_cmd == "list":
        for name, preset in PRESETS.items():
            out.print(f"{name:20s} {preset.description}")
        return 0
    hide_library_output()
    from knowpress.core.device import resolve_device

    device = str(resolve_device(args.device, "--device"))
    path = build_teacher(args.preset, force=args.force, progress=not args.quiet, device=device)
    manifest = json.loads((Path(path) / "knowpress_world.json").read_text())
    out.print(f"teacher: {path}\n{json.dumps(manifest.get('train', {}), indent=1)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    handlers = {"apply": cmd_apply, "check": cmd_check, "eval": cmd_eval, "world": cmd_world,
                "export": cmd_export, "list": cmd_list}  # fmt: skip
    return cli_args.build_parser(handlers)


def _interrupted_hint(args: argparse.Namespace) -> str:
    """What survives an interrupt of this command, and how to continue."""
    if args.command == "apply":
        return "finished stages are kept; rerun with --resume to continue"
    if args.command == "world" and args.world_cmd == "build":
        rerun = "rerun without --force" if args.force else "rerun"
        return f"training is saved every minute; {rerun} to continue from the last save"
    return "nothing was written"


def _error(line: str) -> None:
    text = escape(short(line, 500))  # a message may hold brackets (paths, library errors)
    err.print(f"[red]error:[/red] {text}", highlight=False, soft_wrap=True, markup=True)


def _rerun_advice(args: argparse.Namespace) -> str:
    """How to continue after a disk filled up, by command."""
    if args.command == "apply":
        return "rerun with --resume (finished stages are kept)"
    if args.command == "world" and args.world_cmd == "build":
        without = " without --force" if args.force else ""
        return f"rerun{without} (training continues from its last save, made every minute)"
    return "run it again (nothing was left half-written)"


def _os_error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for an OSError the user can act on (disk full, permissions, missing path),
    and for a library's own error that says the disk is full."""
    filename = getattr(exc, "filename", None)
    where = f": {short(filename, 200)}" if filename else ""
    if disk_full(exc):
        return f"disk full while writing{where}; free some space, then {_rerun_advice(args)}"
    assert isinstance(exc, OSError)
    text = exc.strerror or str(exc).strip().split("\n")[0] or type(exc).__name__
    return f"{text}{where}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with (
            terminate_as_interrupt(program=argv is None),
            quiet_libraries(getattr(args, "quiet", False)),
        ):
            return int(args.func(args))
    except KnowpressError as exc:
        for line in str(exc).splitlines()[:20]:
            _error(line)
        return EXIT_USER
    except KeyboardInterrupt:
        err.print(f"interrupted: {_interrupted_hint(args)}")
        return EXIT_INTERRUPT
    except OSError as exc:
        _error(_os_error_line(exc, args))
        return EXIT_USER
    except Exception as exc:  # the one place a bug becomes a line
        if disk_full(exc):  # a library's own error type for ENOSPC
            _error(_os_error_line(exc, args))
            return EXIT_USER
        if args.debug:
            traceback.print_exc()
        what = short(f"{type(exc).__name__}: {exc}".splitlines()[0], 300)
        _error(
            f"internal error ({what}); this is a bug in knowpress: please report it with the "
            f"traceback that --debug prints"
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
