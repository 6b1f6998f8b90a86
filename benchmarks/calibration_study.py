"""Question: which text should GPTQ and the sensitivity planner calibrate on by default — the
world's training text (the fact-bearing bios and questions the teacher learnt), its held-out
text (bios of the same people in templates the teacher never saw), or half of each?

For each preset and each ``data.calibration.world`` (``train``, ``heldout``, ``mix``), the same
quantize recipes (uniform GPTQ at each ``--bits``, and sensitivity plans at each ``--avg``;
groups of 32) run through the pipeline and each stored folder is scored by knowpress's
evaluation (``scoring.Scorer``, as ``benchmarks/frontier.py`` does). Writes
``benchmarks/results/calibration.json`` (rows kept per preset) and ``calibration.png``.

    python benchmarks/calibration_study.py [PRESET ...] [--bits 4 3 2] [--avg 2.5 3.5]
        [--max-items N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from frontier import _quantize, _sensitivity, ours
from results_io import grouped_bars, save_figure, write_presets
from scoring import Scorer

from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS

RESULTS = Path(__file__).parent / "results" / "calibration.json"
SOURCES = ("train", "heldout", "mix")


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    scorer = Scorer(path, args.max_items)
    recipes = {f"gptq-w{b}": _quantize(b) for b in args.bits}
    recipes |= {f"sens-{a}": _quantize(4, bits_plan=_sensitivity(a)) for a in args.avg}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            data = {"calibration": {"world": source}}
            for point, stage in recipes.items():
                out = Path(tmp) / f"{point}-{source}"
                row = ours(scorer, point, [stage], out, data)[0]
                rows.append({**row, "method": point, "calibration": source})
    return {"preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
            "gated_tasks": scorer.gated, "max_items": args.max_items,
            "threads": torch.get_num_threads(), "rows": rows,
            "best": best_sources(rows)}  # fmt: skip


def best_sources(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per point, the calibration source with the highest worst-task retention (KL breaks
    ties)."""
    points = sorted({r["method"] for r in rows})
    return {p: max((r for r in rows if r["method"] == p),
                   key=lambda r: (r["worst_retention"], -r["kl"]))["calibration"]
            for p in points}  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, results, strict=True):
            points = sorted({r["method"] for r in result["rows"]})
            series = {s: [next(r["worst_retention"] for r in result["rows"]
                               if r["method"] == p and r["calibration"] == s) for p in points]
                      for s in SOURCES}  # fmt: skip
            grouped_bars(ax, points, series)
            ax.set_title(result["preset"])
            ax.set_ylabel("worst-task retention")

    save_figure(path, len(results), draw, width=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["bios-dense-capacity", "bios-dense-small"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--avg", type=float, nargs="+", default=[2.5, 3.5])
    parser.add_argument("--max-items", type=int)
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = []
    for name in args.presets:
        print(name, flush=True)
        fresh.append(measure(name, args))
        write_presets(RESULTS, fresh, plot)


if __name__ == "__main__":
    main()
