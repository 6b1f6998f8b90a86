"""Question: does the instrument tell good compression from bad? RTN at falling bit widths on
teachers loaded to different shares of their capacity, scored against the same teacher.

For each preset: the teacher is scored (its tasks, and ``kl`` on its held-out text and its own
samples); then for each (bits, group) a copy of it is fake-quantized in memory with
``packing.quantize_groups`` — every linear layer but the output head and every fused MoE
expert tensor, per expert — and scored against the teacher's states. A row: per-task
retention, bits retained, KL and top-1 agreement. Writes
``benchmarks/results/sensitivity.json`` (rows of presets not named are kept while their
preset builds the same teacher) and ``sensitivity.png``.

    python benchmarks/sensitivity.py [PRESET ...] [--bits 8 4 3 2] [--groups 32 128]
        [--max-items N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from results_io import save_figure, write_presets

from knowpress.evaluate.evaluator import evaluate_reference, evaluate_runtime, retention_table
from knowpress.formats.io import load_model
from knowpress.methods.quant.targets import select
from knowpress.runtimes.torch import TorchRuntime
from knowpress.teachers import build_teacher
from knowpress.teachers.training import teacher_tasks, training_threads
from knowpress.tensors.packing import dequantize_groups, quantize_groups
from knowpress.worlds import PRESETS, load_world

RESULTS = Path(__file__).parent / "results" / "sensitivity.json"
DEFAULT_PRESETS = [
    "bios-dense-tiny",
    "bios-dense-small",
    "bios-dense-capacity",
    "bios-moe-capacity",
]


@torch.no_grad()
def fake_quantize(model: torch.nn.Module, bits: int, group: int) -> int:
    """Round every targeted weight to ``bits`` (groups of ``group`` inputs, asymmetric) in
    place; fused experts ``[E, out, in]`` per expert row. Returns the tensors rounded."""
    targets = select(model, None, ["lm_head"])
    for target in targets:
        weight = model.get_parameter(target.name)
        rows = weight.reshape(-1, weight.shape[-1])
        g = group if rows.shape[1] % group == 0 else rows.shape[1]
        q = quantize_groups(rows, bits, g, symmetric=False)
        approx = dequantize_groups(q.codes, q.scales, q.zeros, bits, g, rows.dtype)
        weight.copy_(approx.reshape(weight.shape))
    return len(targets)


def measure(name: str, settings: list[tuple[int, int]], max_items: int | None, device: str
            ) -> dict[str, Any]:  # fmt: skip
    start = time.perf_counter()
    path = build_teacher(name, progress=True, device=device)
    world = load_world(path)
    tasks = [*teacher_tasks(world), "kl"]
    model, tokenizer = load_model(path)
    reference = TorchRuntime(model, tokenizer)
    teacher, states = evaluate_reference(reference, world, tasks, max_items)
    # tasks the teacher is near chance on (or scores 0 on) measure nothing: left out of "worst"
    gated = [t for t, s in teacher.items() if s.relative and not s.near_chance and s.score > 0]
    rows = []
    for bits, group in settings:
        model, tokenizer = load_model(path)
        rounded = fake_quantize(model, bits, group)
        scores = evaluate_runtime(TorchRuntime(model, tokenizer), world, tasks, max_items, None,
                                  states)  # fmt: skip
        retention = retention_table(scores, teacher)
        rows.append({
            "bits": bits, "group": group, "tensors": rounded,
            "retention": retention, "worst_retention": min(retention[t] for t in gated),
            "scores": {t: s.score for t, s in scores.items()},
            "kl": scores["kl"].score, "top1": scores["kl"].extra["top1"],
            "kl_p99": scores["kl"].extra["kl_p99"],
            "flips_lost": {t: s.extra["flips/lost"] for t, s in scores.items()
                           if "flips/lost" in s.extra},
        })  # fmt: skip
        print(f"  int{bits} g{group}: " + ", ".join(f"{t} {retention[t]:.3f}" for t in gated)
              + f", kl {rows[-1]['kl']:.4f}, top-1 {rows[-1]['top1']:.3f}")  # fmt: skip
    bits = teacher["bits"]
    return {
        "preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
        "max_items": max_items, "seconds": round(time.perf_counter() - start, 1),
        "teacher_scores": {t: s.score for t, s in teacher.items()},
        "gated_tasks": gated,
        "teacher_bits_per_parameter": bits.extra.get("bits_per_parameter"),
        "rows": rows,
    }  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    titles = ["bits retained", "worst-task retention", "top-1 agreement with the teacher"]

    def draw(axes: list[Any]) -> None:
        for result in results:
            for group in sorted({r["group"] for r in result["rows"]}):
                rows = sorted((r for r in result["rows"] if r["group"] == group),
                              key=lambda r: r["bits"])  # fmt: skip
                bits, label = [r["bits"] for r in rows], f"{result['preset']} g{group}"
                axes[0].plot(bits, [r["retention"]["bits"] for r in rows], "o-", label=label)
                axes[1].plot(bits, [r["worst_retention"] for r in rows], "o-")
                axes[2].plot(bits, [r["top1"] for r in rows], "o-")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.set_xlabel("RTN bits")
            ax.set_xticks([2, 3, 4, 8])

    save_figure(path, 3, draw, width=13 / 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-items", type=int, default=None, help="cap items per task")
    parser.add_argument("--device", default="cpu", help="train uncached teachers on cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    settings = [(b, g) for g in args.groups for b in args.bits]
    fresh = []
    for name in args.presets:
        print(name)
        fresh.append(measure(name, settings, args.max_items, args.device))
        write_presets(RESULTS, fresh, plot)


if __name__ == "__main__":
    main()
