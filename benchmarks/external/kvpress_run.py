"""Answer context-then-question items with NVIDIA kvpress's presses on a transformers teacher.

Runs INSIDE a separate venv that has kvpress (it pins ``transformers < 5.3``, knowpress does
not), so it imports only torch, transformers, kvpress and the standard library, never
knowpress. ``benchmarks/kvpress_compare.py`` writes its input, runs it and scores the answers.

    /work/kvpress-venv/bin/python benchmarks/external/kvpress_run.py IN.json OUT.json

IN.json::

    {"teacher": "<folder with config.json, model.safetensors, tokenizer.json>",
     "threads": 1,
     "items": [{"context": str, "question": str, "max_new_tokens": int,
                "context_ids": [int, ...], "question_ids": [int, ...]}, ...],
     "presses": [{"name": "SnapKVPress", "ratios": [0.5, ...], "kwargs": {...}}, ...]}

``*_ids`` are optional. Without them the tokens are kvpress's own
(``KVPressTextGenerationPipeline.preprocess``: BOS + context, question + "\\n", both with
``add_special_tokens=False``). With them the given tokens are prefilled and decoded as they
are, through the pipeline's own ``_forward`` (prefill the context under the press, then
greedy-decode from the question with the cache; kvpress compresses only in that prefill).
Either way OUT.json records, per item, whether kvpress's own tokenization gives the same ids.

For each press and ratio (``compression_ratio`` = the fraction of the context's KV pairs
REMOVED; 0 runs without a press, the baseline) OUT.json holds the answers in item order and
the wall time::

    {"versions": {"kvpress": ..., "transformers": ..., "torch": ...},
     "tokenization": {"items": n, "same_tokens_as_pipeline": k, "same_split_as_pipeline": k},
     "runs": [{"press": name | null, "compression_ratio": r, "kwargs": {...},
               "seconds": s, "context_tokens": t, "answers": [str, ...]}, ...]}
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def load_pipeline(teacher: str) -> Any:
    """kvpress's registered ``kv-press-text-generation`` pipeline on the teacher (fp32, CPU)."""
    import kvpress  # noqa: F401  (registers the pipeline)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="float32").eval()
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)


def make_press(name: str | None, ratio: float, kwargs: dict[str, Any]) -> Any:
    """The kvpress press ``name`` at ``ratio`` (None for ratio 0: the uncompressed baseline)."""
    import kvpress

    if name is None or ratio == 0:
        return None
    cls = getattr(kvpress, name, None)
    if cls is None:
        version = importlib.metadata.version("kvpress")
        raise SystemExit(f"kvpress {version} has no press named {name!r}")
    return cls(compression_ratio=ratio, **kwargs)


def pipeline_ids(pipe: Any, item: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The context and question ids kvpress's pipeline itself would prefill and decode."""
    limit = min(pipe.tokenizer.model_max_length, int(1e10))
    out = pipe.preprocess(item["context"], questions=[item["question"]], answer_prefix="",
                          max_context_length=limit)  # fmt: skip
    return out["context_ids"][0].tolist(), out["questions_ids"][0][0].tolist()


def token_inputs(pipe: Any, items: list[dict[str, Any]]) -> tuple[list[Any], dict[str, int]]:
    """Per item the ``_forward`` input (given ids, else kvpress's), and how many items have
    the token sequence (``tokens``: context + question ids) and the cut between context and
    question (``split``) of kvpress's own tokenization (items without given ids count)."""
    import torch

    inputs, same = [], {"tokens": 0, "split": 0}
    for item in items:
        own = pipeline_ids(pipe, item)
        given = (item.get("context_ids"), item.get("question_ids"))
        ids = own if given[0] is None else (list(given[0]), list(given[1] or []))
        same["tokens"] += ids[0] + ids[1] == own[0] + own[1]
        same["split"] += ids == own
        inputs.append({"context_ids": torch.tensor([ids[0]]),
                       "questions_ids": [torch.tensor([ids[1]])]})  # fmt: skip
    return inputs, same


def run_press(pipe: Any, press: Any, items: list[dict[str, Any]], inputs: list[Any]) -> Any:
    """Greedy answers of every item under ``press`` (one item at a time) and the seconds taken."""
    import torch

    answers = []
    start = time.perf_counter()
    with torch.inference_mode():
        for item, tensors in zip(items, inputs, strict=True):
            out = pipe._forward(tensors, max_new_tokens=int(item["max_new_tokens"]), press=press)
            answers.append(str(out[0]).strip())
    return answers, time.perf_counter() - start


def versions() -> dict[str, str]:
    return {p: importlib.metadata.version(p) for p in ("kvpress", "transformers", "torch")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.input.read_text())
    threads = int(spec.get("threads", 1))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    pipe = load_pipeline(spec["teacher"])
    items = spec["items"]
    inputs, same = token_inputs(pipe, items)
    context_tokens = sum(int(x["context_ids"].shape[1]) for x in inputs)
    runs = []
    for entry in [{"name": None, "ratios": [0.0], "kwargs": {}}, *spec["presses"]]:
        for ratio in entry["ratios"]:
            press = make_press(entry["name"], float(ratio), entry.get("kwargs", {}))
            answers, seconds = run_press(pipe, press, items, inputs)
            label = entry["name"] or "no press"
            print(f"{label} ratio={ratio}: {len(items)} items in {seconds:.1f}s", flush=True)
            runs.append({"press": entry["name"], "compression_ratio": float(ratio),
                         "kwargs": entry.get("kwargs", {}), "seconds": seconds,
                         "context_tokens": context_tokens, "answers": answers})  # fmt: skip
    tokenization = {"items": len(items), **{f"same_{k}_as_pipeline": v for k, v in same.items()}}
    out = {"versions": versions(), "tokenization": tokenization, "runs": runs}
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
