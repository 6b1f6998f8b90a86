"""Question: how much knowledge do RTN and GPTQ keep at each bit width, against GPTQModel and
llm-compressor on the same teacher and calibration data, and how fast is each?

For each preset: the teacher is scored (its tasks + ``kl``), the same calibration token ids
(``data.calibration`` defaults: the world's training text) go to every method, and each
output is scored against the teacher's states by knowpress's evaluation: per-task retention,
worst-task retention, KL, top-1, flips lost, stored bytes (float tensors counted at 2 bytes
everywhere, as knowpress stores them) and the quantize call's wall time.

- ``rtn`` / ``gptq``: knowpress's methods (symmetric, groups of ``--group`` inputs, every
  linear layer and fused expert tensor but the head), saved as the quantize stage saves them.
- ``gptqmodel``: GPTQModel's GPTQ called directly in ``--gptqmodel-venv``
  (``external/gptqmodel_quantize.py``: its dequantized weights are scored).
- ``llmcompressor-gptq`` / ``-rtn``: llm-compressor 0.14 in ``--llmcompressor-venv``
  (``external/llmcompressor_quantize.py``; its compressed-tensors folder is loaded by knowpress).

Writes ``benchmarks/results/quantize.json`` (rows kept per preset) and ``quantize.png``.

    python benchmarks/quantize.py [PRESET ...] [--bits 8 4 3 2] [--group 32]
        [--gptqmodel-venv DIR] [--llmcompressor-venv DIR] [--max-items N]
        [--methods rtn gptq] [--asymmetric]

A rerun of some rows (``--bits 4 --methods gptq --asymmetric``) keeps the preset's other rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_io import retention_axes, save_figure, write_presets
from scoring import Scorer

from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.formats.sizes import bf16_bytes
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.targets import select
from knowpress.pipeline.calibration import calibration_ids
from knowpress.pipeline.context import Context
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import calibration
from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS

RESULTS = Path(__file__).parent / "results" / "quantize.json"
EXTERNAL = Path(__file__).parent / "external"
DEFAULT_PRESETS = ["bios-dense-capacity", "bios-moe-capacity", "bios-dense-small"]


def ours(scorer: Scorer, name: str, bits: int, group: int, out: Path,
         symmetric: bool = True) -> dict[str, Any]:  # fmt: skip
    """knowpress's method; calibration: the default spec, which yields the very token ids
    the external tools get (``calibration_ids`` is deterministic). Asymmetric rows are
    labelled ``NAME-asym`` (knowpress's packed format: zero points)."""
    model, tokenizer = load_model(scorer.path)
    recipe = validate_recipe({"version": 1, "model": {"path": str(scorer.path)}})
    ctx = Context.for_recipe(recipe, model, tokenizer, out, world=scorer.world)
    method = QUANT_METHODS.get(name).model_validate(
        {"name": name, "bits": bits, "group_size": group, "symmetric": symmetric}
    )
    targets = select(model, None, ["lm_head"])
    plan = {a.target.name: a.method for a in resolve(method, None, targets)}
    start = time.perf_counter()
    method.apply(model, targets, calibration(ctx), Progress(False), plan)
    seconds = time.perf_counter() - start
    save_model(model, tokenizer, out, dtype=torch.bfloat16)
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    label = name if symmetric else f"{name}-asym"
    return scorer.score(out, stored, seconds, method=label, bits=bits, group=group)


def external(scorer: Scorer, venv: Path, tool: str, bits: int, group: int, calib: Path,
             out: Path, method: str, extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``extra``: more arguments for the tool's script (``--asym``, ``--mixed``)."""
    script = EXTERNAL / f"{tool}_quantize.py"
    args = [str(venv / "bin" / "python"), str(script), str(scorer.path), str(out), "--calib",
            str(calib), "--bits", str(bits), "--group", str(group), *(extra or [])]  # fmt: skip
    args += ["--sym"] if tool == "gptqmodel" else ["--method", method]
    # GPTQModel writes logs/ into its working directory; keep them out of the repo.
    run = subprocess.run(args, capture_output=True, text=True, cwd=out.parent)
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return {"method": f"{tool}-{method}", "bits": bits, "group": group, "error": tail}
    result = json.loads(run.stdout.strip().splitlines()[-1])
    folder = out / "dense" if tool == "gptqmodel" else out
    stored = bf16_bytes(out / "gptq") if tool == "gptqmodel" else bf16_bytes(out)
    label = "gptqmodel" if tool == "gptqmodel" else f"llmcompressor-{method}"
    try:
        return scorer.score(folder, stored, result["seconds"], method=label, bits=bits,
                            group=group)  # fmt: skip
    except Exception as exc:  # its output does not load: a result of the comparison too
        message = f"its output does not load: {type(exc).__name__}: {exc}"[:300]
        return {"method": label, "bits": bits, "group": group, "error": [message]}


def calibration_file(scorer: Scorer, folder: Path) -> Path:
    """``folder/calib.json``: the token ids of the default ``data.calibration`` spec (what
    knowpress's stages calibrate on), for the external tools."""
    spec = validate_recipe({"version": 1, "model": {"path": str(scorer.path)}}).data.calibration
    model, tokenizer = load_model(scorer.path)
    ids = calibration_ids(spec, scorer.world, tokenizer, model.config.max_position_embeddings)
    path = folder / "calib.json"
    path.write_text(json.dumps(ids))
    return path


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    scorer = Scorer(path, args.max_items)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_file(scorer, Path(tmp))
        for bits in args.bits:
            for method in args.methods:
                for symmetric in (True, False) if args.asymmetric else (True,):
                    out = Path(tmp) / f"{method}-{bits}-{symmetric}"
                    rows.append(ours(scorer, method, bits, args.group, out, symmetric))
                    print(_line(rows[-1]), flush=True)
            if args.gptqmodel_venv:
                out = Path(tmp) / f"gptqmodel-{bits}"
                rows.append(external(scorer, args.gptqmodel_venv, "gptqmodel", bits, args.group,
                                     calib, out, "gptq"))  # fmt: skip
                print(_line(rows[-1]), flush=True)
            for method in ("gptq", "rtn") if args.llmcompressor_venv else ():
                out = Path(tmp) / f"llmc-{method}-{bits}"
                rows.append(external(scorer, args.llmcompressor_venv, "llmcompressor", bits,
                                     args.group, calib, out, method))  # fmt: skip
                print(_line(rows[-1]), flush=True)
    return {"preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
            "teacher_scores": {t: s.score for t, s in scorer.teacher.items()},
            "gated_tasks": scorer.gated, "max_items": args.max_items, "rows": rows}  # fmt: skip


def keep_rows(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    """A rerun of some rows of a preset (same teacher) keeps its other rows: each fresh
    result gets the previous rows whose (method, bits, group) it did not measure."""
    for result in fresh:
        old = next((p for p in previous if p["preset"] == result["preset"]
                    and p.get("preset_key") == result["preset_key"]), None)  # fmt: skip
        if old is None:
            continue
        measured = {(r["method"], r["bits"], r["group"]) for r in result["rows"]}
        result["rows"] = [*result["rows"], *(r for r in old["rows"]
                          if (r["method"], r["bits"], r["group"]) not in measured)]  # fmt: skip
        result["rows"].sort(key=lambda r: (-r["bits"], r["group"]))


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['method']:20s} int{row['bits']}: failed: {' / '.join(row['error'])}"
    return (f"  {row['method']:20s} int{row['bits']} g{row['group']}: worst "
            f"{row['worst_retention']:.3f}, " + ", ".join(f"{t} {v:.3f}" for t, v in
            row["retention"].items()) + f", kl {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
            f"{row['stored_bytes']:,} B ({row['size_vs_bf16_teacher']:.3f} of bf16), "
            f"{row['seconds']:.2f} s")  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, results, strict=True):
            ok = [r for r in result["rows"] if "error" not in r]
            for method in sorted({r["method"] for r in ok}):
                rows = sorted((r for r in ok if r["method"] == method),
                              key=lambda r: r["stored_bytes"])  # fmt: skip
                ax.plot([r["size_vs_bf16_teacher"] for r in rows],
                        [r["worst_retention"] for r in rows], "o-", label=method)  # fmt: skip
            retention_axes(ax, result["preset"])

    save_figure(path, len(results), draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--gptqmodel-venv", type=Path)
    parser.add_argument("--llmcompressor-venv", type=Path)
    parser.add_argument("--max-items", type=int)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    parser.add_argument(
        "--asymmetric",
        action="store_true",
        help="also knowpress's methods with zero points (NAME-asym rows)",
    )
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = []
    for name in args.presets:  # written after each preset: a later failure loses nothing
        print(name)
        fresh.append(measure(name, args))
        write_presets(RESULTS, fresh, plot, keep_rows)


if __name__ == "__main__":
    main()
