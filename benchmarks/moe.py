"""Question: which expert-pruning score keeps the most knowledge when a quarter or half of an
MoE teacher's experts go, and does the redundancy pre-check see the collapse coming?

For each preset: expert statistics once on the world's training text (``data.calibration``
defaults: 128 sequences of 256 tokens, the last 8 held out as the pre-check's probe); then
for each ``--sparsity`` and method (``reap``, ``frequency``, ``routing_weight``, ``merge``) a
copy of the teacher pruned per layer, saved in bf16 and scored by knowpress's evaluation
against the teacher (per-task retention, worst gated task, KL, bits). Beside each row: the
pre-check's probe KL at that sparsity and its tolerated-sparsity estimate (probe KL ≤ 0.1).

Writes ``benchmarks/results/moe.json`` (rows kept per preset) and ``moe.png``.

    python benchmarks/moe.py [PRESET ...] [--sparsity 0.25 0.5] [--methods reap ...]
        [--max-items N]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_io import save_figure, write_presets
from scoring import Scorer

from knowpress.compress.moe import EXPERT_PRUNERS, expert_stats
from knowpress.compress.moe.budget import choose_keep
from knowpress.compress.moe.precheck import PrecheckSpec, precheck
from knowpress.data.calibration import calibration_batches, calibration_ids
from knowpress.models.io import load_model, save_model
from knowpress.models.moe import moe_blocks, set_expert_counts
from knowpress.models.sizes import bf16_bytes
from knowpress.recipe import CalibrationSpec
from knowpress.world import PRESETS, build_teacher, load_world
from knowpress.world.training import training_threads

RESULTS = Path(__file__).parent / "results" / "moe.json"
DEFAULT_PRESETS = ["bios-moe-capacity", "bios-moe-small"]
PROBE = 8


def prune_copy(teacher: Any, stats: list[Any], method: Any, sparsity: float) -> Any:
    model = copy.deepcopy(teacher)
    blocks = moe_blocks(model)
    keeps = choose_keep([method.scores(s) for s in stats], [b.top_k for b in blocks], sparsity,
                        "per_layer")  # fmt: skip
    for block, record, keep in zip(blocks, stats, keeps, strict=True):
        method.apply(block, record, keep)
    set_expert_counts(model, [len(k) for k in keeps])
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
            width = 0.8 / max(1, len(methods))
            for i, method in enumerate(methods):
                values = [next((r["worst_retention"] for r in result["rows"]
                                if r["method"] == method and r["sparsity"] == s), 0.0)
                          for s in levels]  # fmt: skip
                ax.bar([j + i * width for j in range(len(levels))], values, width, label=method)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))],
                          [f"{s:.0%} experts pruned" for s in levels])  # fmt: skip
            ax.set_title(result["preset"])
            ax.set_ylabel("worst-task retention")

    save_figure(path, len(results), draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(EXPERT_PRUNERS.names()),
                        choices=list(EXPERT_PRUNERS.names()))  # fmt: skip
    parser.add_argument("--max-items", type=int)
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = []
    for name in args.presets:
        print(name)
        fresh.append(measure(name, args))
        write_presets(RESULTS, fresh, plot)


if __name__ == "__main__":
    main()
