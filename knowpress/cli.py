"""``compress`` (alias ``knowpress``): apply | check | eval | export | world | list.

Exit codes: 0 success, 1 gate failed, 2 user error (bad recipe, missing or corrupt files,
disk full, ...: one line each), 3 internal error (a bug: one line, the traceback with
``--debug``), 130 interrupted (Ctrl-C, or SIGTERM from ``kill``, a cancelled CI job or a
scheduler's timeout).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from knowpress.cli_check import add_gate_options, cmd_check, gate_table
from knowpress.cli_eval import cmd_eval
from knowpress.cli_export import add_parser as add_export_parser
from knowpress.errors import KnowpressError, short
from knowpress.evaluate.gate import describe_bounds
from knowpress.interrupts import terminate_as_interrupt

EXIT_GATE, EXIT_USER, EXIT_BUG, EXIT_INTERRUPT = 1, 2, 3, 130
out = Console()
err = Console(stderr=True)


def _quiet_libraries() -> None:
    """transformers' own progress bars and load reports would drown ours."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary(report: dict[str, Any]) -> Table:
    """Retention per task (scores are in report.md; ``kl`` shows its nats/token, being a
    comparison already), sized to fit a terminal."""
    tasks = list(report["tasks"])
    table = Table(title="knowledge retained vs bytes stored (retention vs reference)")
    for col in ["model", "MiB", "vs bf16 ref", "bits/param", *tasks, "worst"]:
        if col == "model":
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, justify="right", overflow="fold")
    for row in report["rows"]:
        size = row.get("size_vs_bf16_reference", row.get("size_ratio"))
        bits = row.get("bits_per_parameter")
        cells = [row["name"], f"{row['stored_bytes'] / 2**20:.2f}", _fmt(size, 3), _fmt(bits, 2)]
        cells += [
            _fmt(row["retention"][t], 3) if t in row["retention"] else _fmt(row["scores"][t], 4)
            for t in tasks
        ]
        worst = row["worst_retention"]
        color = "green" if worst is not None and worst >= 0.95 else "yellow"
        cells.append(f"[{color}]{_fmt(worst, 3)}[/{color}]")
        table.add_row(*cells)
    return table


def cmd_apply(args: argparse.Namespace) -> int:
    from knowpress.recipe import load_recipe

    overrides = [*args.set, *([f"device={args.device}"] if args.device else [])]
    recipe = load_recipe(args.recipe, overrides)
    out_dir = Path(args.output or Path("runs") / Path(args.recipe).stem)
    if args.dry_run:
        _print_plan(recipe, out_dir)
        return 0
    from knowpress.launch import join, launched_world, rank_device
    from knowpress.progress import Progress
    from knowpress.runner import apply

    _quiet_libraries()
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


def _print_plan(recipe: Any, out_dir: Path) -> None:
    """The dry run: everything that can fail without weights is checked before printing."""
    import yaml

    from knowpress.preflight import dry_run

    world, facts = dry_run(recipe)

    def named(spec: Any, default: str) -> str:
        return default if spec is None else (spec.world or spec.path)

    model = (recipe.model.world and f"world preset {recipe.model.world}") or recipe.model.path
    teacher = named(recipe.teacher, "the reference")
    reference = named(recipe.reference, "the model")
    out.print(
        f"[bold]plan[/bold] (dry run: nothing loaded)\n  model:     {model} "
        f"(stored in {recipe.model.dtype}, computed in {recipe.model.compute_dtype})\n"
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


def cmd_world(args: argparse.Namespace) -> int:
    from knowpress.world import PRESETS, build_teacher

    if args.world_cmd == "list":
        for name, preset in PRESETS.items():
            out.print(f"{name:20s} {preset.description}")
        return 0
    _quiet_libraries()
    from knowpress.device import resolve_device

    device = str(resolve_device(args.device, "--device"))
    path = build_teacher(args.preset, force=args.force, progress=not args.quiet, device=device)
    manifest = json.loads((Path(path) / "knowpress_world.json").read_text())
    out.print(f"teacher: {path}\n{json.dumps(manifest.get('train', {}), indent=1)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import knowpress.stages  # noqa: F401
    from knowpress.compress.kv import KV_POLICIES
    from knowpress.compress.moe import EXPERT_PRUNERS
    from knowpress.compress.quant import QUANT_METHODS
    from knowpress.distill import DISTILL_LOSSES
    from knowpress.evaluate.tasks import TASKS
    from knowpress.stage import STAGES
    from knowpress.world import PRESETS

    table = Table(title="registered methods")
    for col in ("family", "name", "what", "paper"):
        table.add_column(col)
    families = [
        ("stage", STAGES), ("quant method", QUANT_METHODS), ("expert pruning", EXPERT_PRUNERS),
        ("KV policy", KV_POLICIES), ("distill loss", DISTILL_LOSSES), ("eval task", TASKS),
    ]  # fmt: skip
    for family, registry in families:
        for name, cls in registry.items():  # type: ignore[attr-defined]
            table.add_row(family, name, cls.summary, cls.paper)
    for name, preset in PRESETS.items():
        table.add_row("world preset", name, preset.description, "")
    out.print(table)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        err.print(
            f"[red]error:[/red] {self.prog}: {short(message, 300)} (see {self.prog} --help)",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(EXIT_USER)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{short(text, 40)!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive (give 1 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description=__doc__.splitlines()[0])
    debug = "print the traceback of an internal error"
    parser.add_argument("--debug", action="store_true", help=debug)
    # --debug after the command too; SUPPRESS keeps a subcommand from resetting it to False
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("apply", parents=[common], help="run a recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="output folder (default: runs/RECIPE_NAME)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="override a recipe field, e.g. stages.0.method.bits=4",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    p.add_argument("--resume", action="store_true", help="skip stages already finished")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe's device)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_apply)

    help_check = "gate a report: exit 1 when knowledge regressed"
    p = sub.add_parser("check", parents=[common], help=help_check)
    p.add_argument("report", help="OUT/report.json (or OUT)")
    p.add_argument("--baseline", help="an older report.json to compare against")
    p.add_argument("--min-retention", type=float)
    p.add_argument("--max-kl", type=float, help="most mean KL (nats/token) the kl task may show")
    p.add_argument("--min-top1", type=float, help="least top-1 agreement of the kl task")
    p.add_argument("--tasks", help="comma-separated tasks to gate (default: all)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="allowed drop vs the baseline's retention (default 0.01)",
    )
    add_gate_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("eval", parents=[common], help="score a model directory on a fact world")
    p.add_argument("--model", required=True)
    p.add_argument("--world", help="preset or teacher dir (default: the model's own world)")
    p.add_argument("--text", help="held-out text (.txt paragraphs or .jsonl) for kl/perplexity")
    p.add_argument("--reference", help="the model kl and flips compare with (a folder)")
    p.add_argument("--tasks", default="recall,perplexity", help="world tasks ('' for none)")
    p.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks (extra 'eval')")
    p.add_argument("--lm-eval-include", help="folder of local harness task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, help="documents per harness task")
    p.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples per harness task")
    p.add_argument("--max-items", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--json", help="also write the scores and sizes here")
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("world", parents=[common], help="build or list fact-world teachers")
    wsub = p.add_subparsers(dest="world_cmd", required=True, parser_class=_Parser)
    help_build = "train (or fetch from cache) a preset's teacher"
    b = wsub.add_parser("build", parents=[common], help=help_build)
    b.add_argument("--preset", default="bios-dense-tiny")
    b.add_argument("--force", action="store_true", help="retrain even if cached")
    b.add_argument("--device", default="cpu", help="train on cpu (default), cuda[:N] or auto")
    b.add_argument("-q", "--quiet", action="store_true")
    wsub.add_parser("list", parents=[common], help="list presets")
    p.set_defaults(func=cmd_world)

    add_export_parser(sub, common)

    help_list = "registered stages, methods, tasks and presets"
    p = sub.add_parser("list", parents=[common], help=help_list)
    p.set_defaults(func=cmd_list)
    return parser


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


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError the user can act on (disk full, permissions, missing path)."""
    where = f": {short(exc.filename, 200)}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        keep = "--resume keeps what finished"
        return f"disk full while writing{where}; free some space and run again ({keep})"
    return f"{exc.strerror or type(exc).__name__}{where}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_as_interrupt(program=argv is None):
            return int(args.func(args))
    except KnowpressError as exc:
        for line in str(exc).splitlines()[:20]:
            _error(line)
        return EXIT_USER
    except KeyboardInterrupt:
        err.print(f"interrupted: {_interrupted_hint(args)}")
        return EXIT_INTERRUPT
    except OSError as exc:
        _error(_os_error_line(exc))
        return EXIT_USER
    except Exception as exc:  # the one place a bug becomes a line
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
