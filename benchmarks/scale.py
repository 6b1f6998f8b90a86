"""Scale benchmark: wall time and peak memory of each stage on randomly initialised real
architectures (Llama dense, Qwen3-MoE) from ~10 M to ~1 B parameters, next to llm-compressor's
oneshot GPTQ W4A16 on the same model and calibration ids in the same run (its own venv, as
benchmarks/external does), with a growth exponent per stage (time ∝ params^k, least squares
on log-log).

Every measurement is a subprocess (``compress apply`` / ``compress eval`` /
``compress export`` / llm-compressor's script), sampled for the peak resident memory of its
process tree; stage rows also quote the stage's own seconds and peak RSS from report.json.
Results are written after every measurement and a rerun skips rows already there.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --llmcompressor-venv /work/venvs/llmc \\
        --sizes llama-10m,llama-100m,llama-336m --calib-samples 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from scale_models import SIZES, build, params_of

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("quantize", "llmcompressor", "prune_experts", "distill", "kl", "export")


def measured(cmd: list[str], env: dict[str, str] | None = None,
             timeout: float = 6 * 3600) -> dict[str, Any]:  # fmt: skip
    """Run ``cmd``; wall seconds, peak RSS of its process tree (sampled every 50 ms), exit
    code and the last output lines."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    peak, root = 0, psutil.Process(proc.pid)
    lines: list[str] = []
    import threading

    def drain() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.05)
    reader.join()
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_bytes": peak,
            "rc": proc.returncode, "tail": "".join(lines[-5:])[-800:]}  # fmt: skip


def _yaml(data: dict[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stage_of(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0] if "stages" in report else report["rows"][1]
    return {k: stage.get(k) for k in ("seconds", "peak_rss_bytes", "bytes_after") if k in stage}


def run_stage(kind: str, model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One knowpress measurement on ``model``."""
    compress = [sys.executable, "-m", "knowpress.cli"]
    calib = {"path": str(model / "text.txt"), "samples": args.calib_samples,
             "seq_len": args.seq_len}  # fmt: skip
    # the smallest real evaluation (kl caps its tokens; perplexity scores the whole text)
    small_eval = {"tasks": ["kl"], "text": {"path": str(model / "text.txt"), "max_tokens": 256},
                  "batch_size": 8}  # fmt: skip
    stage = {
        "quantize": {"kind": "quantize", "method": {"name": "gptq", "bits": 4, "group_size": 128}},
        "prune_experts": {"kind": "prune_experts", "method": {"name": "reap"}, "sparsity": 0.25,
                          "precheck": {"enabled": False}},
        "distill": {"kind": "distill", "student": {"make": "width", "mlp_keep": 0.5,
                                                   "heads_keep": 0.5},
                    "train": {"steps": 10, "batch_size": 4, "seq_len": 128,
                              "checkpoint_every": 100}},
    }.get(kind)  # fmt: skip
    out = work / f"out-{kind}"
    if stage is not None:
        recipe = {"version": 1, "model": {"path": str(model), "compute_dtype": args.dtype},
                  "data": {"calibration": calib}, "stages": [stage], "evaluate": small_eval,
                  "device": args.device}  # fmt: skip
        path = _yaml(recipe, work / f"{kind}.yaml")
        row = measured([*compress, "apply", str(path), "-o", str(out), "--force", "-q"])
        if row["rc"] == 0:
            row["stage_report"] = _stage_of(out)
        return row
    if kind == "kl":
        return measured([*compress, "eval", "--model", str(model), "--reference", str(model),
                         "--tasks", "kl", "--text", str(work / "kl.txt"), "--device",
                         args.device, "--batch-size", "8", "-q"])  # fmt: skip
    if kind == "export":
        return measured([*compress, "export", str(model), "-o", str(out), "--format", "onnx",
                         "--weights", "int4", "--block-size", "128", "--force", "-q"])  # fmt: skip
    if kind == "llmcompressor":
        if args.llmcompressor_venv is None:
            return {"skipped": "no --llmcompressor-venv"}
        script = Path(__file__).parent / "external" / "llmcompressor_quantize.py"
        python = str(args.llmcompressor_venv / "bin" / "python")
        row = measured([python, str(script), str(model), str(out), "--calib",
                        str(work / "calib.json"), "--bits", "4", "--group", "128"])  # fmt: skip
        last = [ln for ln in row["tail"].splitlines() if ln.startswith("{")]
        if row["rc"] == 0 and last:
            row["oneshot"] = json.loads(last[-1])
        return row
    raise ValueError(kind)


def prepare(name: str, work: Path, args: argparse.Namespace) -> Path:
    """The model folder, its calibration ids (as knowpress draws them, for llm-compressor) and
    the kl text of ``--kl-tokens`` words."""
    model = work / "model"
    if not (model / "config.json").is_file():
        build(name, model)
    calib = work / "calib.json"
    if not calib.is_file():
        from transformers import AutoTokenizer

        from knowpress.core.specs import CalibrationSpec
        from knowpress.pipeline.calibration import calibration_ids

        spec = CalibrationSpec(path=str(model / "text.txt"), samples=args.calib_samples,
                               seq_len=args.seq_len)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model)
        calib.write_text(json.dumps(calibration_ids(spec, None, tokenizer, 2048)))
    words = (model / "text.txt").read_text().split()
    (work / "kl.txt").write_text(" ".join((words * (1 + args.kl_tokens // len(words)))
                                          [: args.kl_tokens]) + "\n")  # fmt: skip
    return model


def exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per family and stage, ``k`` in seconds ∝ params^k (least squares on logs)."""
    fits: dict[str, dict[str, float]] = {}
    for family in sorted({r["family"] for r in rows}):
        for stage in STAGES:
            points = [(math.log(r["params"]), math.log(_seconds(r))) for r in rows
                      if r["family"] == family and r["stage"] == stage and _seconds(r)]  # fmt: skip
            if len(points) < 2:
                continue
            mx = sum(x for x, _ in points) / len(points)
            my = sum(y for _, y in points) / len(points)
            var = sum((x - mx) ** 2 for x, _ in points)
            k = sum((x - mx) * (y - my) for x, y in points) / var
            fits.setdefault(family, {})[stage] = round(k, 3)
    return fits


def _seconds(row: dict[str, Any]) -> float | None:
    """The stage's own seconds (knowpress stages, llm-compressor's oneshot), else the wall."""
    if row.get("rc") not in (0, None) or "skipped" in row:
        return None
    inner = row.get("stage_report", {}).get("seconds") or row.get("oneshot", {}).get("seconds")
    return float(inner or row["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="llama-10m,llama-100m,llama-336m,llama-1b,"
                        "qwen3moe-10m,qwen3moe-100m,qwen3moe-350m")  # fmt: skip
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--kl-tokens", type=int, default=50_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="model.compute_dtype")
    parser.add_argument("--llmcompressor-venv", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/knowpress-scale"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = parser.parse_args()
    old = json.loads(args.json.read_text()) if args.json.is_file() else {}
    settings = {k: getattr(args, k) for k in ("calib_samples", "seq_len", "kl_tokens", "device",
                                              "dtype")}  # fmt: skip
    rows = old.get("rows", []) if old.get("settings") == settings else []
    done = {(r["size"], r["stage"]) for r in rows}
    for name in args.sizes.split(","):
        family = SIZES[name][0]
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        model = prepare(name, work, args)
        bf16 = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for stage in args.stages.split(","):
            if (name, stage) in done or (stage == "prune_experts" and family == "llama"):
                continue
            print(f"{name}: {stage} ...", flush=True)
            row = {"size": name, "family": family, "params": params_of(name), "bf16_bytes": bf16,
                   "stage": stage, **run_stage(stage, model, work, args)}  # fmt: skip
            print(f"  {json.dumps({k: v for k, v in row.items() if k != 'tail'})}", flush=True)
            rows.append(row)
            write(args.json, settings, rows)


def write(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import platform

    payload = {"settings": settings, "threads": os.environ.get("OMP_NUM_THREADS"),
               "cpu": platform.processor() or platform.machine(), "rows": rows,
               "exponents": exponents(rows)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    plot(rows, path.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds and peak RSS / bf16 bytes against parameters, one line per stage (log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["family"], r["stage"]) for r in rows})
    for family, stage in keys:
        pts = sorted((r["params"], _seconds(r), _peak(r) / r["bf16_bytes"]) for r in rows
                     if (r["family"], r["stage"]) == (family, stage) and _seconds(r))  # fmt: skip
        if not pts:
            continue
        label = f"{family} {stage}"
        left.plot([p for p, _, _ in pts], [s for _, s, _ in pts], "o-", label=label)
        right.plot([p for p, _, _ in pts], [m for _, _, m in pts], "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds (stage / oneshot)")
    right.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak RSS / bf16 bytes")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _peak(row: dict[str, Any]) -> float:
    """The stage's own peak RSS (knowpress), else the process tree's (llm-compressor)."""
    return float(row.get("stage_report", {}).get("peak_rss_bytes") or row["peak_rss_bytes"])


if __name__ == "__main__":
    main()
