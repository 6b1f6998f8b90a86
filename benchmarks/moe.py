"""Question: which expert-pruning score keeps the most knowledge when a quarter or half of an
MoE teacher's experts go, and does the redundancy pre-check see the collapse coming?

For each preset: expert statistics once on the world's training text (``data.calibration``
defaults: 128 sequences of 256 tokens, the last 8 held out as the pre-check's probe); then
for each ``--sparsity`` and method (``reap``, ``frequency``, ``routing_weight``, ``merge``) a
copy of the teacher pruned per layer, saved in bf16 and scored by knowpress's evaluation
against the teacher (per-task retention, worst gated task, KL, bits). Beside each row: the
pre-check's probe KL at that sparsity and its tolerated-sparsity estimate (probe KL ≤ 0.1).

Then (``--parts precision skipping``), through ``compress apply`` recipes on the same
teacher: the routed experts quantized with GPTQ (group 32; attention and head left in bf16)
at uniform 2 and 3 bits and by the ``moe_lp`` bit plan at 2.5 and 3.0 average bits, each
row followed by the same model after ``recalibrate_routers`` (selection agreement before and
after); REAP pruning at 25% with and without re-calibration; and dynamic expert skipping
(``skip_experts``, ODP) at several β: active expert parameters per token and retention.

Writes ``benchmarks/results/moe.json`` (rows kept per preset) and ``moe.png``.

    python benchmarks/moe.py [PRESET ...] [--sparsity 0.25 0.5] [--methods reap ...]
        [--parts pruning precision skipping] [--max-items N]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_io import earlier, grouped_bars, save_figure, write_presets
from scoring import Scorer

from knowpress.arch.moe import moe_blocks
from knowpress.core.specs import CalibrationSpec
from knowpress.formats.io import load_model, save_model
from knowpress.formats.sizes import bf16_bytes
from knowpress.methods.experts import EXPERT_PRUNERS, expert_stats
from knowpress.methods.experts.budget import prune_blocks
from knowpress.methods.experts.precheck import PrecheckSpec, precheck
from knowpress.pipeline.calibration import calibration_batches, calibration_ids
from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS, load_world

RESULTS = Path(__file__).parent / "results" / "moe.json"
DEFAULT_PRESETS = ["bios-moe-capacity", "bios-moe-small"]
PROBE = 8


def prune_copy(teacher: Any, stats: list[Any], method: Any, sparsity: float) -> Any:
    model = copy.deepcopy(teacher)
    prune_blocks(model, moe_blocks(model), stats, method, sparsity, "per_layer")
    return model


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    scorer = Scorer(path, args.max_items)
    teacher, tokenizer = load_model(path)
    teacher.eval().requires_grad_(False)
    world = load_world(path)
    positions = int(teacher.config.max_position_embeddings)
    sequences = calibration_ids(CalibrationSpec(), world, tokenizer, positions)
    batches = calibration_batches(sequences[:-PROBE])
    probe = calibration_batches(sequences[-PROBE:])
    start = time.perf_counter()
    stats = expert_stats(teacher, batches)
    stats_seconds = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    estimates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method_name in args.methods:
            method = EXPERT_PRUNERS.get(method_name)(name=method_name)
            estimate = precheck(teacher, moe_blocks(teacher), stats, method, "per_layer", probe,
                                PrecheckSpec(), max(args.sparsity))  # fmt: skip
            estimates[method_name] = estimate
            for sparsity in args.sparsity:
                start = time.perf_counter()
                model = prune_copy(teacher, stats, method, sparsity)
                out = Path(tmp) / f"{method_name}-{sparsity}"
                save_model(model, tokenizer, out, dtype=torch.bfloat16)
                row = scorer.score(out, bf16_bytes(out), time.perf_counter() - start,
                                   method=method_name, sparsity=sparsity,
                                   experts_left=moe_blocks(model)[0].num_experts,
                                   probe_kl=estimate["kl_by_sparsity"].get(f"{sparsity:g}"),
                                   tolerated_sparsity=estimate["tolerated_sparsity"])  # fmt: skip
                rows.append(row)
                print(_line(row), flush=True)
    return {
        "preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
        "experts": moe_blocks(teacher)[0].num_experts, "top_k": moe_blocks(teacher)[0].top_k,
        "calibration_sequences": len(sequences) - PROBE, "stats_seconds": round(stats_seconds, 2),
        "max_items": args.max_items, "gated_tasks": scorer.gated,
        "teacher_scores": {t: s.score for t, s in scorer.teacher.items()},
        "precheck": estimates, "rows": rows,
    }  # fmt: skip


def _run(name: str, stages: list[dict[str, Any]], args: argparse.Namespace,
         tmp: str, label: str) -> list[dict[str, Any]]:  # fmt: skip
    """One recipe through the runner: a row per stage (retention, KL, bytes, details)."""
    from knowpress.pipeline.recipe import validate_recipe
    from knowpress.pipeline.runner import apply

    recipe = validate_recipe({
        "version": 1, "model": {"world": name}, "stages": stages,
        "evaluate": {"tasks": [*TASKS, "kl"], "max_items": args.max_items},
    })  # fmt: skip
    report = apply(recipe, Path(tmp) / label).report
    rows = []
    for row, stage in zip(report["rows"][1:], report["stages"], strict=True):
        details = {k: v for k, v in stage["details"].items()
                   if k in KEPT_DETAILS}  # fmt: skip
        out = {"label": label, "stage": stage["kind"], "stored_bytes": row["stored_bytes"],
               "size_vs_bf16": row["size_vs_bf16_reference"], "retention": row["retention"],
               "worst_retention": row["worst_retention"], "kl": row["scores"]["kl"],
               "details": details}  # fmt: skip
        rows.append(out)
        print(f"  {label:22s} {stage['kind']:19s} worst {_f(row['worst_retention'])}, "
              + ", ".join(f"{t} {_f(v)}" for t, v in row["retention"].items())
              + f", kl {row['scores']['kl']:.4f}, {row['stored_bytes'] / 2**20:.3f} MiB "
              + " ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, dict | list)),
              flush=True)  # fmt: skip
    return rows


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


TASKS = ["recall", "paraphrase", "bits"]
KEPT_DETAILS = ("agreement_before", "agreement_after", "bits_plan", "active_experts_per_token",
                "active_expert_share", "active_expert_parameters_per_token",
                "routed_expert_parameters_per_token", "precheck")  # fmt: skip
EXPERTS_ONLY = ["lm_head", "re:.*self_attn.*", "model.embed_tokens"]


def precision(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    gptq = {"name": "gptq", "bits": 3, "group_size": 32}
    plans: dict[str, dict[str, Any]] = {
        "uniform int2": {"method": {**gptq, "bits": 2}},
        "uniform int3": {"method": gptq},
        "moe_lp avg 2.5": {"method": gptq, "bits_plan": {"name": "moe_lp", "avg_bits": 2.5}},
        "moe_lp avg 3.0": {"method": gptq, "bits_plan": {"name": "moe_lp", "avg_bits": 3.0}},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in plans.items():
            quantize = {"kind": "quantize", "ignore": EXPERTS_ONLY, **settings}
            rows += _run(name, [quantize, {"kind": "recalibrate_routers"}], args, tmp, label)
        prune = {"kind": "prune_experts", "sparsity": 0.25}
        rows += _run(name, [prune, {"kind": "recalibrate_routers"}], args, tmp, "reap 25%")
    return rows


def skipping(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for beta in args.betas:
            stage = {"kind": "skip_experts", "policy": {"name": "odp", "beta": beta}}
            rows += _run(name, [stage], args, tmp, f"odp beta {beta:g}")
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"  {row['sparsity']:.2f} {row['method']:14s} worst {row['worst_retention']:.3f}, "
        + ", ".join(f"{t} {v:.3f}" for t, v in row["retention"].items())
        + f", kl {row['kl']:.4f}, probe kl {row['probe_kl']:.4f} "
        f"(tolerated ≈ {row['tolerated_sparsity']:g}), {row['stored_bytes'] / 2**20:.2f} MiB"
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, results, strict=True):
            methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
            levels = sorted({r["sparsity"] for r in result["rows"]})
            series = {m: [next((r["worst_retention"] for r in result["rows"]
                                if r["method"] == m and r["sparsity"] == s), 0.0)
                          for s in levels] for m in methods}  # fmt: skip
            grouped_bars(ax, [f"{s:.0%} experts pruned" for s in levels], series)
            ax.set_title(result["preset"])
            ax.set_ylabel("worst-task retention")

    save_figure(path, len(results), draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(EXPERT_PRUNERS.names()),
                        choices=list(EXPERT_PRUNERS.names()))  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--betas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--max-items", type=int)
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = []
    for name in args.presets:
        print(name)
        result: dict[str, Any] = {"preset": name, "preset_key": PRESETS.get(name).key(), "rows": []}
        if "pruning" in args.parts:
            result = measure(name, args)
        for part in ("precision", "skipping"):
            if part in args.parts:
                result[part] = PARTS[part](name, args)
        fresh.append(result)
        write_presets(RESULTS, fresh, plot, prepare=_carry_parts)


PARTS = {"pruning": measure, "precision": precision, "skipping": skipping}


def _carry_parts(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    """Parts not re-run keep their earlier figures (same preset and teacher key)."""
    for result in fresh:
        for key, value in (earlier(previous, result) or {}).items():
            if key not in result or (key == "rows" and not result["rows"]):
                result[key] = value


if __name__ == "__main__":
    main()
