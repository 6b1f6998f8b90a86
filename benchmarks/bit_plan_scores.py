"""Question: which sensitivity score ranks tensors the way the loss does, across depth?

For one preset's teacher and the quantize stage's default calibration ids: the ``fisher`` and
``output`` scores of ``methods/quant/bit_plans/scores.py`` for every linear but the head at
each width, and the ground truth — the mean next-token KL(teacher ‖ model) per token on the
same ids with *only that tensor* rounded (RTN, same group size) to that width. Spearman rank
correlation of each score with the KL over all (tensor, width) pairs and within each width
(the ranking a global byte budget relies on). Writes ``benchmarks/results/bit_plan_scores.json``.

    python benchmarks/bit_plan_scores.py [PRESET] [--bits 2 3 4] [--group 32] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from knowpress.arch.sequential import Onload
from knowpress.formats.io import load_model
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.bit_plans.scores import measure
from knowpress.methods.quant.plan import resolve
from knowpress.methods.quant.targets import select
from knowpress.pipeline.calibration import calibration_batches, calibration_ids
from knowpress.pipeline.recipe import validate_recipe
from knowpress.teachers import build_teacher
from knowpress.tensors.grids import Grid, dequantize
from knowpress.worlds import load_world

RESULTS = Path(__file__).parent / "results" / "bit_plan_scores.json"


def ranks(values: list[float]) -> torch.Tensor:
    order = torch.tensor(values, dtype=torch.float64).argsort()
    out = torch.empty(len(values), dtype=torch.float64)
    out[order] = torch.arange(len(values), dtype=torch.float64)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def end_kl(model: Any, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean KL(reference ‖ model) per token over ``batches``."""
    total, count = 0.0, 0
    for ids, ref in zip(batches, reference, strict=True):
        logp = model(ids).logits.float().log_softmax(-1)
        total += float((ref.exp() * (ref - logp)).sum())
        count += ids.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="bios-dense-tiny")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    path = build_teacher(args.preset, progress=True)
    model, tokenizer = load_model(path)
    model.eval()
    spec = validate_recipe({"version": 1, "model": {"path": str(path)}}).data.calibration
    ids = calibration_ids(spec, load_world(path), tokenizer, model.config.max_position_embeddings)
    batches = calibration_batches(ids[: args.samples])
    method = QUANT_METHODS.get("rtn")(name="rtn", bits=4, group_size=args.group)
    planned = resolve(method, None, select(model, None, ["lm_head"]))
    scores = {}
    for kind in ("fisher", "output"):
        scores[kind], _ = measure(model, planned, batches, Onload(), args.bits, kind == "fisher")
    with torch.no_grad():
        reference = [model(b).logits.float().log_softmax(-1) for b in batches]
    truth: dict[str, list[float]] = {}
    for a in planned:
        linear = model.get_submodule(a.target.module)
        weight = linear.weight.detach().clone()
        truth[a.target.name] = []
        for bits in args.bits:
            q = method.quantize_weight(weight, bits)
            grid = Grid("int", bits, True)
            with torch.no_grad():
                linear.weight.copy_(dequantize(q.codes, q.scales, q.zeros, grid, args.group))
            truth[a.target.name].append(end_kl(model, batches, reference))
            with torch.no_grad():
                linear.weight.copy_(weight)
    names = list(truth)
    result: dict[str, Any] = {"preset": args.preset, "bits": args.bits, "group": args.group,
                              "samples": args.samples, "tensors": len(names)}  # fmt: skip
    for kind, table in scores.items():
        flat = [table[n][c] for n in names for c in range(len(args.bits))]
        kl = [truth[n][c] for n in names for c in range(len(args.bits))]
        result[f"{kind}_spearman_all"] = round(spearman(flat, kl), 4)
        for c, bits in enumerate(args.bits):
            result[f"{kind}_spearman_int{bits}"] = round(
                spearman([table[n][c] for n in names], [truth[n][c] for n in names]), 4
            )
    result["rows"] = {n: {"kl": truth[n], "fisher": scores["fisher"][n],
                          "output": scores["output"][n]} for n in names}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    main()
