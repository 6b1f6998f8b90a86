"""Question: how fast and how big is the exported ONNX model against PyTorch, same run?

Exports one teacher (default: the cached ``bios-dense-small``, Llama 4 x 192) three ways
through ``knowpress.pipeline.export`` — float32, int8 dynamic, int4 ``MatMulNBits`` (RTN,
block 32, symmetric, ``accuracy_level`` 4; at level 0 to show what level 4 buys on CPU; and with
``store: float16`` for the tensors left float) — and
times greedy decoding of the same prompts with the same KV-cache loop shape on each graph
(onnxruntime, ``runtimes/ort_session.py``) and on the PyTorch float32 model in eager mode
(``DynamicCache``, one token per forward). Per row: first-token latency (prefill + the first
token), decode tokens/s after it (medians over repeats), both as ratios against PyTorch
measured in this run; file bytes; parity (max |Δlogits|, greedy equality) against the PyTorch
model holding the same weights. Threads: torch and onnxruntime get the same ``--threads``.
Writes ``benchmarks/results/export.json``.

    python benchmarks/export.py [--preset bios-dense-small] [--prompt 64] [--new 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.progress import Progress
from knowpress.formats.io import load_model
from knowpress.runtimes.ort_session import OnnxDecoder
from knowpress.testing.export import export_folder

GRAPHS = {
    "onnx float32": {"weights": "float32"},
    "onnx int8 dynamic": {"weights": "int8", "parity": {"greedy_equal": False}},
    "onnx int4 acc4": {"weights": "int4", "accuracy_level": 4, "ignore": []},
    "onnx int4 acc0": {"weights": "int4", "accuracy_level": 0, "ignore": []},
    "onnx int4 acc4 f16": {
        "weights": "int4",
        "accuracy_level": 4,
        "ignore": [],
        "store": "float16",
    },
}


def _torch_run(model: Any, prompt: list[int], new: int) -> tuple[float, float]:
    """(first-token seconds, decode tokens/s) of greedy decoding in eager PyTorch."""
    from transformers import DynamicCache

    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt])
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        first = time.perf_counter()
        for _ in range(new - 1):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
        end = time.perf_counter()
    return first - start, (new - 1) / (end - first)


def _onnx_run(decoder: OnnxDecoder, prompt: list[int], new: int) -> tuple[float, float]:
    start = time.perf_counter()
    ids = np.array([prompt], np.int64)
    logits, state = decoder.forward(ids, np.ones_like(ids), decoder.empty(1))
    token = logits[:, -1:].argmax(-1)
    first = time.perf_counter()
    for _ in range(new - 1):
        logits, state = decoder.forward(token, np.ones_like(token), state)
        token = logits[:, -1:].argmax(-1)
    end = time.perf_counter()
    return first - start, (new - 1) / (end - first)


def _median(run: Any, repeats: int) -> tuple[float, float]:
    run()  # warm-up
    results = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def _rows(teacher: str, prompt: list[int], args: Any, torch_first: float, torch_tps: float,
          torch_bytes: int) -> list[dict[str, Any]]:  # fmt: skip
    """Export each of ``GRAPHS`` and time it against the PyTorch figures."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in Progress().track(GRAPHS.items(), "export + time"):
            model, tokenizer = load_model(teacher, dtype="float32")
            folder = Path(tmp) / label.replace(" ", "-")
            with contextlib.redirect_stdout(io.StringIO()):
                metrics = export_folder(model, tokenizer, folder, **options)
            spec = json.loads((folder / "knowpress_export.json").read_text())["graph"]
            decoder = OnnxDecoder(folder / "model.onnx", spec, threads=args.threads)
            first, tps = _median(lambda d=decoder: _onnx_run(d, prompt, args.new), args.repeats)
            size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
            rows.append(
                {
                    "graph": label,
                    "weights": metrics["weights"],
                    "file_bytes": size,
                    "bytes_vs_torch_fp32": size / torch_bytes,
                    "first_token_s": first,
                    "first_token_ratio_vs_torch": torch_first / first,
                    "decode_tok_s": tps,
                    "decode_ratio_vs_torch": tps / torch_tps,
                    "parity_max_abs_logits": metrics["parity_max_abs_logits"],
                    "parity_greedy_equal": metrics["parity_greedy_equal"],
                }
            )
            print(
                f"{label:>18}: decode {tps:7.1f} tok/s ({tps / torch_tps:4.2f}x torch), "
                f"first token {first * 1e3:6.1f} ms ({torch_first / first:4.2f}x), "
                f"{size / 1e6:6.2f} MB ({size / torch_bytes:4.2f}x), parity "
                f"{metrics['parity_max_abs_logits']:.3g} greedy equal "
                f"{metrics['parity_greedy_equal']}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bios-dense-small")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from knowpress.teachers import build_teacher

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    teacher = build_teacher(args.preset, progress=False)
    vocab = load_model(teacher, dtype="float32")[0].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(4, vocab, (args.prompt - 1,), generator=gen).tolist()]
    model, _ = load_model(teacher, dtype="float32")
    torch_first, torch_tps = _median(lambda: _torch_run(model, prompt, args.new), args.repeats)
    torch_bytes = sum(p.stat().st_size for p in Path(teacher).glob("*.safetensors"))
    rows = _rows(teacher, prompt, args, torch_first, torch_tps, torch_bytes)
    result = {
        "question": "ONNX fp32 / int8 / int4 decode and first-token latency vs PyTorch fp32 eager",
        "config": vars(args) | {"out": Path(args.out).name},
        "model": Path(teacher).name,
        "torch_fp32_eager": {
            "first_token_s": torch_first,
            "decode_tok_s": torch_tps,
            "file_bytes": torch_bytes,
        },
        "goal": "int4 >= 2x PyTorch fp32 eager decode",
        "goal_met": next(r for r in rows if r["graph"] == "onnx int4 acc4")["decode_ratio_vs_torch"]
        >= 2.0,
        "rows": rows,
    }
    print(
        f"torch fp32 eager: decode {torch_tps:.1f} tok/s, first token {torch_first * 1e3:.1f} "
        f"ms, {torch_bytes / 1e6:.2f} MB; goal met: {result['goal_met']}"
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
