"""Question: what do packed RTN weights cost and save, against the float model, same run?

Builds a random Llama-style model from a config (no download), quantizes it with RTN at
int8 and int4, and reports, as ratios against the float baseline measured in this run:
stored bytes (safetensors on disk), peak-free forward latency (median of repeats), and the
weight SQNR. Writes ``benchmarks/results/rtn_footprint.json``.

    python benchmarks/rtn_footprint.py [--hidden 256] [--layers 4] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from knowpress.formats import save_model, stored_bytes
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.tensors.packing import sqnr_db
from knowpress.tensors.qlinear import QuantLinear
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def _latency(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "rtn_footprint.json")
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    ids = torch.randint(4, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_llama(
            hidden_size=args.hidden,
            layers=args.layers,
            vocab_size=1024,
            intermediate_size=4 * args.hidden,
        )
        save_model(base, tiny_tokenizer(1024), Path(tmp) / "fp")
        base_bytes = stored_bytes(Path(tmp) / "fp")
        base_time = _latency(base, ids, args.repeats)
        for bits, group in ((8, 64), (4, 64), (4, 32)):
            model = tiny_llama(
                hidden_size=args.hidden,
                layers=args.layers,
                vocab_size=1024,
                intermediate_size=4 * args.hidden,
            )
            method = RTN(name="rtn", bits=bits, group_size=group)
            sqnrs = []
            for target in select(model, None, ["lm_head"]):
                linear = model.get_submodule(target.module)
                q = method.quantize_linear(linear)
                sqnrs.append(sqnr_db(linear.weight, q.dequantized_weight()))
                model.set_submodule(target.module, q)
            assert any(isinstance(m, QuantLinear) for m in model.modules())
            folder = Path(tmp) / f"int{bits}-g{group}"
            save_model(model, tiny_tokenizer(1024), folder)
            rows.append(
                {
                    "method": f"rtn int{bits} g{group}",
                    "stored_bytes": stored_bytes(folder),
                    "bytes_ratio_vs_float": stored_bytes(folder) / base_bytes,
                    "latency_ratio_vs_float": _latency(model, ids, args.repeats) / base_time,
                    "mean_weight_sqnr_db": statistics.mean(sqnrs),
                }
            )
    result = {
        "baseline": {"stored_bytes": base_bytes, "latency_s": base_time},
        "config": vars(args),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in rows:
        print(
            f"{row['method']:16s} bytes x{row['bytes_ratio_vs_float']:.3f}  "
            f"latency x{row['latency_ratio_vs_float']:.2f}  "
            f"SQNR {row['mean_weight_sqnr_db']:.1f} dB"
        )


if __name__ == "__main__":
    main()
