"""The ``compress`` argument parser: every command and option, each with its help line
(plain text: ``--help`` prints it as written, so no reST markup)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from knowpress.core.errors import short

EXIT_USER = 2
DESCRIPTION = (
    "compress (alias knowpress): compress language models with YAML recipes and measure the "
    "knowledge they keep against the bytes they store"
)
Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        from knowpress.cli.app import err

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


def quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bars (knowpress's, and those of transformers, datasets, "
        "huggingface_hub and other tqdm users)",
    )  # fmt: skip


def build_parser(handlers: dict[str, Handler]) -> argparse.ArgumentParser:
    """The parser; ``handlers`` maps each command to its function (``args.func``)."""
    from knowpress.cli.export import add_parser as add_export

    parser = Parser(prog="compress", description=DESCRIPTION)
    debug = "print the traceback of an internal error (exit 3)"
    parser.add_argument("--debug", action="store_true", help=debug)
    # --debug after the command too; SUPPRESS keeps a subcommand from resetting it to False
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _apply(sub, common, handlers["apply"])
    _check(sub, common, handlers["check"])
    _eval(sub, common, handlers["eval"])
    _world(sub, common, handlers["world"])
    add_export(sub, common, handlers["export"])
    help_list = "registered stages, methods, bit plans, KV policies, losses, tasks and presets"
    p = sub.add_parser("list", parents=[common], help=help_list, description=help_list)
    p.set_defaults(func=handlers["list"])
    return parser


def _apply(sub: Any, common: Parser, handler: Handler) -> None:
    what = "run a recipe: each stage, its evaluation, the report and the gate"
    p = sub.add_parser("apply", parents=[common], help=what, description=what)
    p.add_argument("recipe", help="the recipe's YAML file")
    p.add_argument("-o", "--output", help="output folder (default: runs/RECIPE_NAME)")
    p.add_argument(
        "--set", action="append", default=[], metavar="K=V",
        help="override a recipe field (a YAML value), e.g. stages.0.method.bits=4; repeatable",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="check the recipe, its sources and every stage against the model's shapes, print "
        "the plan, write nothing",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a run: skip finished stages")
    p.add_argument(
        "--force", action="store_true",
        help="replace an existing knowpress run folder (never a folder of other files, nor "
        "one holding an input of the run)",
    )  # fmt: skip
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the recipe's device)")
    quiet_flag(p)
    p.set_defaults(func=handler)


def _check(sub: Any, common: Parser, handler: Handler) -> None:
    from knowpress.cli.check import add_gate_options

    what = "gate a report: exit 1 when knowledge regressed"
    p = sub.add_parser("check", parents=[common], help=what, description=what)
    p.add_argument("report", help="OUT/report.json (or the run folder OUT)")
    p.add_argument("--baseline", help="an older report.json to compare against")
    p.add_argument(
        "--min-retention", type=float,
        help="least retention every gated task must keep, in (0, 1] (default: the recipe's gate)",
    )  # fmt: skip
    p.add_argument("--max-kl", type=float, help="most mean KL (nats/token) the kl task may show")
    p.add_argument("--min-top1", type=float, help="least top-1 agreement of the kl task")
    p.add_argument("--tasks", help="comma-separated tasks to gate (default: all)")
    p.add_argument(
        "--tolerance", type=float, default=0.01,
        help="allowed drop vs the baseline's retention (default 0.01)",
    )  # fmt: skip
    add_gate_options(p)
    p.set_defaults(func=handler)


def _eval(sub: Any, common: Parser, handler: Handler) -> None:
    what = "score a model folder or stage artifact on a fact world, a text or harness tasks"
    p = sub.add_parser("eval", parents=[common], help=what, description=what)
    p.add_argument(
        "--model", required=True,
        help="a model folder, a stage folder of a run (any format, ONNX included) or a hub id",
    )  # fmt: skip
    p.add_argument("--world", help="preset or teacher folder (default: the model's own world)")
    p.add_argument("--text", help="held-out text (.txt paragraphs or .jsonl) for kl/perplexity")
    p.add_argument("--reference", help="the model kl and flips compare with (a folder)")
    p.add_argument(
        "--tasks", default="recall,perplexity",
        help="comma-separated world tasks (default recall,perplexity; '' for none)",
    )  # fmt: skip
    p.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks (extra 'eval')")
    p.add_argument("--lm-eval-include", help="folder of local harness task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, help="documents per harness task")
    p.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples per harness task")
    p.add_argument("--max-items", type=positive_int, help="at most this many items per task")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="sequences per forward (default 64)"
    )
    p.add_argument("--json", help="also write the scores and sizes to this file")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow the model folder's own Python code (custom architectures)",
    )  # fmt: skip
    quiet_flag(p)
    p.set_defaults(func=handler)


def _world(sub: Any, common: Parser, handler: Handler) -> None:
    what = "build or list fact-world teachers"
    p = sub.add_parser("world", parents=[common], help=what, description=what)
    wsub = p.add_subparsers(dest="world_cmd", required=True, parser_class=Parser)
    what = (
        "train (or fetch from the cache) a preset's teacher; an interrupted build continues "
        "from its last save (every minute) when run again"
    )
    b = wsub.add_parser("build", parents=[common], help=what, description=what)
    b.add_argument(
        "--preset", default="bios-dense-tiny",
        help="the preset to build (default bios-dense-tiny; see compress world list)",
    )  # fmt: skip
    b.add_argument(
        "--force", action="store_true",
        help="retrain from scratch even if cached (drops an unfinished build's save)",
    )  # fmt: skip
    b.add_argument("--device", default="cpu", help="train on cpu (default), cuda[:N] or auto")
    quiet_flag(b)
    wsub.add_parser("list", parents=[common], help="list presets", description="list presets")
    p.set_defaults(func=handler)
