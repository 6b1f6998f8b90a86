"""Question: how much does each teacher preset know, per task, per parameter, per stored byte?

For every preset given: build the teacher (or take it from the cache; a fresh build is
timed), reload it from disk, score every knowledge task that applies to its world
(``training.teacher_tasks`` + perplexity), and report the task's chance score, knowledge
bits (Physics of LMs 3.3), bits per parameter and bits per stored byte (bytes of the
safetensors files). Writes ``benchmarks/results/knowledge_instrument.json``.

    python benchmarks/knowledge_instrument.py [PRESET ...] [--max-items N]

Default presets: bios-dense-tiny. Training uses ``KNOWPRESS_TRAIN_THREADS`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from knowpress.evaluate.evaluator import evaluate_runtime
from knowpress.evaluate.runtime import TorchRuntime
from knowpress.models.io import load_model, parameter_count, stored_bytes
from knowpress.world import PRESETS, build_teacher, load_world, teacher_dir, teacher_info
from knowpress.world.teacher import is_complete
from knowpress.world.training import teacher_tasks, training_threads

RESULTS = Path(__file__).parent / "results" / "knowledge_instrument.json"


def measure(name: str, max_items: int | None) -> dict[str, Any]:
    """Build (timed when not cached) and score one preset's teacher."""
    cached = is_complete(teacher_dir(name))
    start = time.perf_counter()
    path = build_teacher(name, progress=True)
    build_seconds = None if cached else round(time.perf_counter() - start, 1)
    model, tokenizer = load_model(path)
    world = load_world(path)
    runtime = TorchRuntime(model, tokenizer)
    tasks = [*teacher_tasks(world), "perplexity"]
    start = time.perf_counter()
    scores = evaluate_runtime(runtime, world, tasks, max_items)
    size, params = stored_bytes(path), parameter_count(model)
    bits = scores["bits"].score
    return {
        "preset": name,
        "architecture": PRESETS.get(name).architecture,
        "teacher": str(path),
        "build_seconds": build_seconds,
        "train_seconds": teacher_info(path)["train"]["seconds"],
        "eval_seconds": round(time.perf_counter() - start, 1),
        "parameters": params,
        "stored_bytes": size,
        "bits": bits,
        "bits_per_parameter": bits / params,
        "bits_per_stored_byte": bits / size,
        "tasks": {
            t: {"score": s.score, "chance": s.chance, "near_chance": s.near_chance, "n": s.n,
                "extra": s.extra}
            for t, s in scores.items()
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["bios-dense-tiny"])
    parser.add_argument("--max-items", type=int, default=None, help="cap items per task")
    args = parser.parse_args()
    # Evaluation too: several torch threads on a shared CPU spin-wait each other (training.py).
    torch.set_num_threads(training_threads())
    rows = [measure(name, args.max_items) for name in args.presets]
    for row in rows:
        built = row["build_seconds"]
        build = "cached" if built is None else f"built in {built} s"
        print(
            f"{row['preset']} ({row['architecture']}, {row['parameters']:,} params, "
            f"{row['stored_bytes']:,} B, {build}, train {row['train_seconds']} s)"
        )
        for task, s in row["tasks"].items():
            flag = "  NEAR CHANCE" if s["near_chance"] else ""
            chance = "n/a" if s["chance"] is None else f"{s['chance']:.4f}"
            print(f"  {task:13s} {s['score']:10.4f}  (chance {chance}, n={s['n']}){flag}")
            sizes = sorted(int(k.split("=")[1]) for k in s["extra"] if k.startswith("em/bios="))
            if sizes:  # long_context: EM at each haystack size
                print("    " + ", ".join(
                    f"{n} bios {s['extra'][f'em/bios={n}']:.2f} "
                    f"({s['extra'][f'tokens/bios={n}']:.0f} tok)" for n in sizes
                ))  # fmt: skip
        print(
            f"  bits/param {row['bits_per_parameter']:.5f}  "
            f"bits/stored byte {row['bits_per_stored_byte']:.5f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
