"""Question: how much does each teacher preset know, per task, per parameter, per stored byte?

For every preset given: build the teacher (or take it from the cache; a fresh build is
timed), reload it from disk, score every knowledge task that applies to its world
(``training.teacher_tasks`` + perplexity), and report the task's chance score, knowledge
bits (Physics of LMs 3.3), bits per parameter and bits per stored byte (bytes of the
safetensors files). Writes ``benchmarks/results/knowledge_instrument.json``: this run's rows,
plus the earlier rows of other presets whose teacher is still what the preset builds (same
preset key), so slow presets can be measured in separate runs; ``--replace`` keeps only this
run's rows.

    python benchmarks/knowledge_instrument.py [PRESET ...] [--max-items N] [--device D] [--replace]

Default presets: bios-dense-tiny. Training uses ``KNOWPRESS_TRAIN_THREADS`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from results_io import merge

from knowpress.evaluate.evaluator import evaluate_runtime
from knowpress.formats import stored_bytes
from knowpress.runtimes.loader import load_runtime
from knowpress.teachers import build_teacher
from knowpress.teachers.training import teacher_tasks, training_threads
from knowpress.worlds import PRESETS, load_world, teacher_dir, teacher_info
from knowpress.worlds.store import is_complete

RESULTS = Path(__file__).parent / "results" / "knowledge_instrument.json"


def measure(name: str, max_items: int | None, device: str = "cpu") -> dict[str, Any]:
    """Build on ``device`` (timed when not cached) and score one preset's teacher (on the CPU)."""
    cached = is_complete(teacher_dir(name))
    start = time.perf_counter()
    path = build_teacher(name, progress=True, device=device)
    build_seconds = None if cached else round(time.perf_counter() - start, 1)
    runtime = load_runtime(path)
    world = load_world(path)
    tasks = [*teacher_tasks(world), "perplexity"]
    start = time.perf_counter()
    scores = evaluate_runtime(runtime, world, tasks, max_items)
    size, params = stored_bytes(path), runtime.parameter_count()
    embedding = embedding_parameters(runtime.model)
    bits = scores["bits"].score
    return {
        "preset": name,
        "preset_key": PRESETS.get(name).key(),
        "max_items": max_items,
        "architecture": PRESETS.get(name).architecture,
        "teacher": str(path),
        "build_seconds": build_seconds,
        "train_seconds": teacher_info(path)["train"]["seconds"],
        "train_device": teacher_info(path)["train"].get("device", "cpu"),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "parameters": params,
        "stored_bytes": size,
        "bits": bits,
        "bits_per_parameter": bits / params,
        "embedding_parameters": embedding,
        "bits_per_nonembedding_parameter": bits / (params - embedding),
        "bits_per_stored_byte": bits / size,
        "tasks": {
            t: {"score": s.score, "chance": s.chance, "near_chance": s.near_chance, "n": s.n,
                "extra": s.extra}
            for t, s in scores.items()
        },
    }  # fmt: skip


def embedding_parameters(model: torch.nn.Module) -> int:
    """Input embedding elements, plus the output head's when it is not tied to them."""
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not inputs
    return inputs.numel() + (head.weight.numel() if untied else 0)


def long_context_line(extra: dict[str, float]) -> str:
    """long_context's EM and prompt tokens per haystack size, and at the trained sizes."""
    sizes = sorted(int(k.split("=")[1]) for k in extra if k.startswith("em/bios="))
    line = ", ".join(
        f"{n} bios {extra[f'em/bios={n}']:.2f} ({extra[f'tokens/bios={n}']:.0f} tok)" for n in sizes
    )
    if "em/trained_lengths" in extra:
        line += (
            f"; trained lengths (<= {extra['trained_bios']:.0f} bios) "
            f"{extra['em/trained_lengths']:.4f}"
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["bios-dense-tiny"])
    parser.add_argument("--max-items", type=int, default=None, help="cap items per task")
    parser.add_argument("--device", default="cpu", help="train uncached teachers on cpu or cuda")
    parser.add_argument("--replace", action="store_true", help="drop the rows of other presets")
    args = parser.parse_args()
    # Evaluation too: several torch threads on a shared CPU spin-wait each other (training.py).
    torch.set_num_threads(training_threads())
    rows = [measure(name, args.max_items, args.device) for name in args.presets]
    for row in rows:
        built = row["build_seconds"]
        build = "cached" if built is None else f"built in {built} s"
        print(
            f"{row['preset']} ({row['architecture']}, {row['parameters']:,} params, "
            f"{row['stored_bytes']:,} B, {build}, "
            f"train {row['train_seconds']} s on {row['train_device']})"
        )
        for task, s in row["tasks"].items():
            flag = "  NEAR CHANCE" if s["near_chance"] else ""
            chance = "n/a" if s["chance"] is None else f"{s['chance']:.4f}"
            print(f"  {task:13s} {s['score']:10.4f}  (chance {chance}, n={s['n']}){flag}")
            if "em/bios=1" in s["extra"]:
                print("    " + long_context_line(s["extra"]))
        print(
            f"  bits/param {row['bits_per_parameter']:.5f} (without the "
            f"{row['embedding_parameters']:,} embedding parameters "
            f"{row['bits_per_nonembedding_parameter']:.5f})  "
            f"bits/stored byte {row['bits_per_stored_byte']:.5f}"
        )
    keep = not args.replace and RESULTS.is_file()
    merged = merge(json.loads(RESULTS.read_text())["rows"] if keep else [], rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": merged}, indent=1) + "\n")
    print(f"wrote {RESULTS} ({len(merged)} rows: {', '.join(r['preset'] for r in merged)})")


if __name__ == "__main__":
    main()
