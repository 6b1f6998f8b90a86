"""Question: how much of a teacher's knowledge does each knowpress point keep per stored byte,
against llm-compressor (and GPTQModel) on the same teacher checkpoint, calibration ids and
evaluation, in one run?

Every knowpress point is a recipe run through ``knowpress.pipeline.runner.apply`` (the stages
a user runs: quantize with a plan, qad, distill, ...); each stage's stored folder is then
scored by ``scoring.Scorer`` (knowpress's evaluation against the teacher's states, as
``benchmarks/quantize.py`` scores): worst gated task's retention, KL, stored bytes / bf16
teacher. A chain gives one row per stage, so ``gptq-w2 -> qad`` shows both points.

Anchors (optional venvs, run in the same process tree on the same calibration ids):
``--llmcompressor-venv``: llm-compressor 0.14 GPTQ W4A16 symmetric and asymmetric at g32 and
g64 (g128 does not divide these teachers' 64- and 192-wide inputs, and llm-compressor refuses
it), W3 and W2 at g32, and a mixed scheme (attention W8, MLP W4, g32); ``--gptqmodel-venv``:
GPTQModel 7.6 GPTQ at W4, W3, W2 g32. Their folders are scored by the same Scorer.

Writes ``benchmarks/results/frontier.json`` (rows kept per preset) and ``frontier.png`` (worst
task retention vs stored bytes / bf16 teacher, Pareto front of each tool drawn).

    python benchmarks/frontier.py [PRESET ...] [--llmcompressor-venv DIR] [--gptqmodel-venv DIR]
        [--points NAME ...] [--qad-steps 300] [--max-items N]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from quantize import calibration_file, external, keep_rows
from results_io import retention_axes, save_figure, write_presets
from scoring import Scorer

from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS

RESULTS = Path(__file__).parent / "results" / "frontier.json"
DEFAULT_PRESETS = ["bios-dense-capacity", "bios-dense-small"]
GROUP = 32
# llm-compressor schemes: (label, bits, group, symmetric, mixed)
LLMC_SCHEMES = [
    ("w4-g32", 4, 32, True, False), ("w4-g32-asym", 4, 32, False, False),
    ("w4-g64", 4, 64, True, False), ("w4-g64-asym", 4, 64, False, False),
    ("w8attn-w4mlp-g32", 4, 32, True, True), ("w3-g32", 3, 32, True, False),
    ("w3-g32-asym", 3, 32, False, False), ("w2-g32", 2, 32, True, False),
]  # fmt: skip


def _quantize(bits: int, symmetric: bool = True, **extra: Any) -> dict[str, Any]:
    method = {"name": "gptq", "bits": bits, "group_size": GROUP, "symmetric": symmetric}
    return {"kind": "quantize", "method": method, **extra}


def _qad(steps: int) -> dict[str, Any]:
    every = max(1, steps // 4)
    return {"kind": "qad", "train_weights": True, "loss": {"name": "forward_kl"},
            "train": {"steps": steps, "batch_size": 16, "warmup": 10,
                      "checkpoint_every": every}}  # fmt: skip


def _sensitivity(avg: float) -> dict[str, Any]:
    return {"name": "sensitivity", "avg_bits": avg, "candidates": [2, 3, 4, 8]}


def _embed(bits: int) -> dict[str, Any]:
    """The embedding (tied to the head) packed too, after qad (which trains packed linears
    only): at these sizes it is a large share of the bytes (0.58 of bios-dense-capacity's at
    int4 g32), which llm-compressor leaves in bf16."""
    return {"kind": "quantize", "method": {"name": "rtn", "bits": bits, "group_size": GROUP},
            "targets": ["model.embed_tokens"], "ignore": []}  # fmt: skip


def points(steps: int) -> dict[str, list[dict[str, Any]]]:
    """Every knowpress point: name -> the stages of its recipe (a row per stage)."""
    half = {"make": "width", "mlp_keep": 0.5, "heads_keep": 0.5}
    return {
        "gptq-w4": [_quantize(4), _qad(steps)],
        "gptq-w4-asym": [_quantize(4, symmetric=False), _qad(steps)],
        "gptq-w4-asym-qad3x": [_quantize(4, symmetric=False), _qad(3 * steps)],
        "gptq-w3": [_quantize(3), _qad(steps)],
        "gptq-w2": [_quantize(2), _qad(steps)],
        "sens-4": [_quantize(4, bits_plan=_sensitivity(4.0)), _qad(steps)],
        "sens-4-asym": [_quantize(4, symmetric=False, bits_plan=_sensitivity(4.0)), _qad(steps)],
        "sens-3.5": [_quantize(4, bits_plan=_sensitivity(3.5)), _qad(steps)],
        "sens-3": [_quantize(3, bits_plan=_sensitivity(3.0)), _qad(steps)],
        "sens-2.5": [_quantize(2, bits_plan=_sensitivity(2.5)), _qad(steps)],
        "gptq-w2-embed4": [_quantize(2), _qad(steps), _embed(4)],
        "w8-embed4": [_quantize(8), _embed(4)],
        "sens-7-embed8": [_quantize(8, bits_plan=_sensitivity(7.0)), _qad(steps), _embed(8)],
        # bios-dense-capacity: linears at 7.25 bits on average + an int8 embedding store what
        # llm-compressor's W4 g32 stores with a bf16 embedding (0.499 vs 0.503 of bf16)
        "sens-7.25-embed8": [_quantize(8, bits_plan=_sensitivity(7.25)), _qad(steps),
                             _embed(8)],
        "half-w3-embed4": [
            {"kind": "distill", "student": half, "loss": {"name": "taid"},
             "train": {"steps": 3 * steps, "batch_size": 32, "lr": 1e-3,
                       "checkpoint_every": steps}},
            _quantize(3), _qad(steps), _embed(4),
        ],
    }  # fmt: skip


def ours(scorer: Scorer, name: str, stages: list[dict[str, Any]], out: Path,
         data: dict[str, Any] | None = None) -> list[dict]:  # fmt: skip
    """Run the point's recipe (its own evaluation cut to a few kl items: the Scorer scores
    every stage's folder afterwards; ``data``: the recipe's data section) and score each
    stage's stored folder."""
    recipe = validate_recipe({
        "version": 1, "model": {"path": str(scorer.path)}, "stages": stages,
        "evaluate": {"tasks": ["kl"], "max_items": 8}, **({"data": data} if data else {}),
    })  # fmt: skip
    start = time.perf_counter()
    apply(recipe, out, force=True)
    print(f"  {name}: ran in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for folder in sorted(p for p in (out / "stages").iterdir() if p.is_dir()):
        record = json.loads((folder / "knowpress_stage.json").read_text())
        label = f"{name}/{folder.name}"  # bytes_after: the stage's stored files, as measured
        rows.append(scorer.score(folder, record["bytes_after"], record["seconds"], method=label,
                                 tool="knowpress", point=name,
                                 format=record["format"]))  # fmt: skip
        print(_line(rows[-1]), flush=True)
    return rows


def anchors(scorer: Scorer, args: argparse.Namespace, calib: Path, tmp: Path) -> list[dict]:
    rows = []
    for label, bits, group, symmetric, mixed in LLMC_SCHEMES if args.llmcompressor_venv else ():
        extra = ([] if symmetric else ["--asym"]) + (["--mixed"] if mixed else [])
        row = external(scorer, args.llmcompressor_venv, "llmcompressor", bits, group, calib,
                       tmp / f"llmc-{label}", "gptq", extra)  # fmt: skip
        rows.append({**row, "method": f"llmcompressor/{label}", "tool": "llm-compressor"})
        print(_line(rows[-1]), flush=True)
    if args.gptqmodel_venv:
        for bits in (4, 3, 2):
            row = external(scorer, args.gptqmodel_venv, "gptqmodel", bits, GROUP, calib,
                           tmp / f"gptqmodel-{bits}", "gptq")  # fmt: skip
            rows.append({**row, "method": f"gptqmodel/w{bits}-g32", "tool": "gptqmodel"})
            print(_line(rows[-1]), flush=True)
    return rows


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every anchor and point on one preset; the preset's entry is written after each of
    them (``write_presets`` keeps the rows a rerun does not measure), so a stopped run loses
    at most the point it was on."""
    path = build_teacher(name, progress=True)
    scorer = Scorer(path, args.max_items)
    wanted = points(args.qad_steps)
    chosen = args.points or list(wanted)
    entry: dict[str, Any] = {
        "preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
        "teacher_scores": {t: s.score for t, s in scorer.teacher.items()},
        "gated_tasks": scorer.gated, "max_items": args.max_items, "qad_steps": args.qad_steps,
        "threads": torch.get_num_threads(), "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_file(scorer, Path(tmp))
        if args.llmcompressor_venv or args.gptqmodel_venv:
            entry["rows"] = anchors(scorer, args, calib, Path(tmp))
            write_presets(args.results, [copy.deepcopy(entry)], plot, _keep)
        for point in chosen:
            entry["rows"] += ours(scorer, point, wanted[point], Path(tmp) / point)
            write_presets(args.results, [copy.deepcopy(entry)], plot, _keep)
    return entry


def equal_bytes(rows: list[dict[str, Any]], tolerance: float = 0.02) -> list[dict[str, Any]]:
    """For each llm-compressor scheme: knowpress's best point within ``tolerance`` of its
    bytes (and the best stored as compressed-tensors, which vLLM loads), and the retention
    differences (the README's "at equal bytes" table)."""
    ok = [r for r in rows if "error" not in r]
    table = []
    for anchor in (r for r in ok if r.get("tool") == "llm-compressor"):
        near = [r for r in ok if r.get("tool") == "knowpress"
                and abs(r["stored_bytes"] / anchor["stored_bytes"] - 1) <= tolerance]  # fmt: skip
        if not near:
            continue
        best = max(near, key=lambda r: r["worst_retention"])
        entry = {"anchor": anchor["method"], "anchor_bytes": anchor["stored_bytes"],
                 "anchor_worst": anchor["worst_retention"], "ours": best["method"],
                 "ours_format": best.get("format"), "ours_bytes": best["stored_bytes"],
                 "ours_worst": best["worst_retention"],
                 "gain": best["worst_retention"] - anchor["worst_retention"]}  # fmt: skip
        ct = [r for r in near if r.get("format") == "hf-compressed-tensors"]
        if ct:
            top = max(ct, key=lambda r: r["worst_retention"])
            entry |= {"ours_ct": top["method"], "ours_ct_bytes": top["stored_bytes"],
                      "ours_ct_worst": top["worst_retention"],
                      "gain_ct": top["worst_retention"] - anchor["worst_retention"]}  # fmt: skip
        table.append(entry)
    return table


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both bytes (fewer) and worst retention (more)."""
    front, best = [], -1.0
    for row in sorted(rows, key=lambda r: (r["stored_bytes"], -r["worst_retention"])):
        if row["worst_retention"] > best:
            front.append(row)
            best = row["worst_retention"]
    return front


def markdown(results: list[dict[str, Any]]) -> str:
    """The README table: per preset and llm-compressor scheme, knowpress's best point within
    2 % of its bytes (its folder format), and the best one stored as compressed-tensors."""
    lines = ["| teacher | llm-compressor scheme: bytes / bf16, worst | knowpress best at ±2 % "
             "bytes (format): bytes / bf16, worst | gain | best compressed-tensors point: "
             "worst | gain |", "|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        bf16 = next(r["stored_bytes"] / r["size_vs_bf16_teacher"] for r in result["rows"]
                    if "error" not in r)  # fmt: skip
        for row in result["equal_bytes"]:
            ct = (f"{row['ours_ct']}: {row['ours_ct_worst']:.3f} | {row['gain_ct']:+.3f}"
                  if "ours_ct" in row else "none | ")  # fmt: skip
            lines.append(
                f"| {result['preset']} | {row['anchor'].split('/', 1)[1]}: "
                f"{row['anchor_bytes'] / bf16:.3f}, {row['anchor_worst']:.3f} | "
                f"{row['ours']} ({row.get('ours_format') or '?'}): "
                f"{row['ours_bytes'] / bf16:.3f}, {row['ours_worst']:.3f} | "
                f"{row['gain']:+.3f} | {ct} |"
            )
    return "\n".join(lines)


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['method']:32s} failed: {' / '.join(row['error'])}"
    return (f"  {row['method']:32s} worst {row['worst_retention']:.3f}, kl {row['kl']:.4f}, "
            f"{row['stored_bytes']:,} B ({row['size_vs_bf16_teacher']:.3f} of bf16), "
            f"{row['seconds']:.1f} s")  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, results, strict=True):
            ok = [r for r in result["rows"] if "error" not in r]
            for tool, marker in (("knowpress", "o"), ("llm-compressor", "s"), ("gptqmodel", "^")):
                mine = [r for r in ok if r.get("tool") == tool]
                if not mine:
                    continue
                dots = ax.scatter([r["size_vs_bf16_teacher"] for r in mine],
                                  [r["worst_retention"] for r in mine], marker=marker,
                                  alpha=0.5, label=tool)  # fmt: skip
                front = pareto(mine)
                ax.step([r["size_vs_bf16_teacher"] for r in front],
                        [r["worst_retention"] for r in front], where="post",
                        color=dots.get_facecolor()[0])  # fmt: skip
            retention_axes(ax, result["preset"])

    save_figure(path, len(results), draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--llmcompressor-venv", type=Path)
    parser.add_argument("--gptqmodel-venv", type=Path)
    parser.add_argument("--points", nargs="+", choices=list(points(1)))
    parser.add_argument("--qad-steps", type=int, default=300)
    parser.add_argument("--max-items", type=int)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to merge rows into")
    parser.add_argument("--table", action="store_true", help="print the README table, run nothing")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.results.read_text())["presets"]))
        return
    torch.set_num_threads(training_threads())
    for name in args.presets:
        print(name, flush=True)
        measure(name, args)


def _keep(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    """A rerun of some points keeps the preset's other rows (``quantize.keep_rows``)."""
    for result in fresh:
        for row in result["rows"]:
            row.setdefault("bits", 0)
            row.setdefault("group", 0)
    keep_rows(previous, fresh)
    for result in fresh:
        result["equal_bytes"] = equal_bytes(result["rows"])


if __name__ == "__main__":
    main()
