"""Question: does llama.cpp run knowpress's GGUF files as knowpress scores them, and what do
they cost in bytes and knowledge?

Exports one teacher (default: the cached ``bios-dense-tiny``, Llama 2 x 128) to GGUF through
``knowpress.pipeline.export_gguf``: ``q8_0``, ``q4_0`` and ``q4_k`` from its float weights,
``q4_0`` from RTN int4 group-32 codes and ``q8_0`` from RTN int8 ones (carried code for
code). Per file, knowpress's own figures: bytes against the teacher's safetensors in bf16;
parity (the file read back with the gguf package's dequantizers against the PyTorch model
holding the same weights); the
error against the float teacher (max |Δlogits| relative to the largest logit, greedy
agreement on the parity prompts); recall exact match of the dequantized PyTorch model
(``torch-gguf``) on the world's trained questions. Then llama.cpp itself, through
llama-cpp-python (``--llama-python``: an interpreter that imports ``llama_cpp``; it builds
llama.cpp from source, about 18 minutes on two cores, so this is a benchmark and not a
CI test):

- tokenization: llama.cpp's ids for the world's held-out texts and questions against the
  Hugging Face tokenizer's;
- logits: llama.cpp (all positions) against the dequantized PyTorch model on the same
  token ids (the questions' prompts): max |Δ| relative to the largest logit;
- greedy: ``--new`` tokens per question from both on the same prompt ids: answers equal,
  token agreement, and llama.cpp's recall exact match;
- Q4_K: knowpress's blocks against ggml's ``quantize_row_q4_K_ref`` (the ``libggml-base``
  shipped in llama_cpp, through ctypes) on random rows: the share of identical blocks.

Writes ``benchmarks/results/gguf.json``. (Not named gguf.py: the script's folder comes first
on sys.path, and ``import gguf`` would import it.)

    python benchmarks/gguf_export.py --llama-python /path/to/venv/bin/python
        [--preset bios-dense-tiny] [--questions 64] [--new 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.evaluate.metrics import exact_match
from knowpress.formats.io import load_model
from knowpress.formats.sizes import bf16_bytes
from knowpress.testing.export import gguf_folder

#: name -> (weights, bits of the RTN g32 codes the linears get first, or 0 for float)
FILES = {
    "q8_0": ("q8_0", 0),
    "q4_0": ("q4_0", 0),
    "q4_k": ("q4_k", 0),
    "rtn int4 -> q4_0 (carried)": ("q4_0", 4),
    "rtn int8 -> q8_0 (carried)": ("q8_0", 8),  # codes reach -128, which ggml never writes
}

#: run by --llama-python: a job (JSON on stdin) -> results (JSON on stdout)
WORKER = r"""
import ctypes, json, sys
from pathlib import Path
import numpy as np
import llama_cpp
from llama_cpp import Llama

job = json.load(sys.stdin)
out = {"llama_cpp_python": llama_cpp.__version__}
if job.get("q4k"):
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ref = lib.quantize_row_q4_K_ref
    ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.load(job["q4k"]["values"]).astype(np.float32).ravel()
    ours = np.load(job["q4k"]["blocks"]).reshape(-1, 144)
    theirs = np.zeros(ours.size, np.uint8)
    ref(x.ctypes.data, theirs.ctypes.data, x.size)
    out["q4k_identical_blocks"] = float((ours == theirs.reshape(-1, 144)).all(axis=1).mean())
    out["q4k_blocks"] = int(ours.shape[0])
for name, spec in job["files"].items():
    llm = Llama(model_path=spec["path"], n_ctx=job["n_ctx"], logits_all=True, verbose=False,
                n_threads=1, n_batch=job["n_ctx"])
    texts = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]
    worst, scale, tokens = 0.0, 0.0, []
    reference = np.load(spec["logits"])
    for i, prompt in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(prompt)
        ref = reference[f"p{i}"]
        got = np.array(llm.scores[: len(prompt)])
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        new = []
        for _ in range(job["new"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(token)
            if token == job["eos"]:
                break
            llm.eval([token])
        tokens.append(new)
    out[name] = {"tokenized": texts, "max_abs_logits": worst, "max_rel_logits": worst / scale,
                 "greedy": tokens}
print(json.dumps(out))
"""


@torch.no_grad()
def _greedy(model: Any, prompt: list[int], new: int, eos: int) -> list[int]:
    """Greedy tokens on one unpadded prompt, stopping after end-of-sequence (as the worker)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _answer(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _recall(tokenizer: Any, answers: list[list[int]], items: list[Any]) -> float:
    return float(
        np.mean(
            [
                exact_match(_answer(tokenizer, a), q.answer)
                for a, q in zip(answers, items, strict=True)
            ]
        )
    )


def _share(ours: list[list[int]], theirs: list[list[int]]) -> str:
    return f"{sum(a == b for a, b in zip(ours, theirs, strict=True))}/{len(theirs)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bios-dense-tiny")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--llama-python", default=None, help="python that imports llama_cpp")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from knowpress.core.progress import Progress
    from knowpress.formats.gguf.kquant import quantize_q4_k
    from knowpress.formats.gguf.reader import read_model
    from knowpress.methods.quant.rtn import RTN
    from knowpress.methods.quant.targets import select
    from knowpress.teachers import build_teacher
    from knowpress.worlds import load_world

    teacher = build_teacher(args.preset, progress=False)
    base, tokenizer = load_model(teacher, dtype="float32")
    world = load_world(teacher)
    items = world.questions("trained")[: args.questions]
    prompts = [tokenizer(q.prompt)["input_ids"] for q in items]
    texts = world.heldout_texts(16) + [q.prompt for q in items]
    eos = tokenizer.eos_token_id
    reference_bytes = bf16_bytes(Path(teacher))
    teacher_answers = [_greedy(base, p, args.new, eos) for p in prompts]
    rows: list[dict[str, Any]] = []
    job: dict[str, Any] = {"files": {}, "prompts": prompts, "texts": texts, "new": args.new,
                           "eos": eos, "n_ctx": base.config.max_position_embeddings}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="knowpress-gguf-"))
    for name, (weights, rtn) in FILES.items():
        model = copy.deepcopy(base)
        if rtn:
            RTN(name="rtn", bits=rtn, group_size=32).apply(
                model,
                select(model, None, ["lm_head"]),
                None,
                Progress(False),  # type: ignore[arg-type]
            )
        folder = work / f"f{len(rows)}"
        metrics = gguf_folder(model, tokenizer, folder, weights=weights)
        back = read_model(folder / "model.gguf")
        answers = [_greedy(back, p, args.new, eos) for p in prompts]
        with torch.no_grad():
            logits = {
                f"p{i}": back(torch.tensor([p])).logits[0].numpy() for i, p in enumerate(prompts)
            }
        np.savez(folder / "logits.npz", **logits)
        job["files"][name] = {
            "path": str(folder / "model.gguf"),
            "logits": str(folder / "logits.npz"),
        }
        size = (folder / "model.gguf").stat().st_size
        rows.append({
            "file": name,
            "weights": metrics["weights"],
            "file_bytes": size,
            "size_vs_bf16": round(size / reference_bytes, 4),
            "carried": metrics["carried"],
            "requantized": metrics["requantized"],
            "quantized": metrics["quantized"],
            "parity_max_abs_logits": metrics["parity_max_abs_logits"],
            "parity_greedy_equal": metrics["parity_greedy_equal"],
            "vs_teacher_max_rel_logits": round(metrics["quantization_max_rel_logits"], 5),
            "vs_teacher_greedy_agreement": metrics["quantization_greedy_agreement"],
            "recall_em_torch_gguf": _recall(tokenizer, answers, items),
            "_answers": answers,
        })  # fmt: skip
        print(f"{name}: {size:,} bytes ({size / reference_bytes:.3f} of bf16), "
              f"{metrics['weights']}; vs teacher rel {metrics['quantization_max_rel_logits']:.4f}; "
              f"recall EM {rows[-1]['recall_em_torch_gguf']:.3f}", flush=True)  # fmt: skip
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 1024)) * 0.05).astype(np.float32)
    values[0, :256] = 0
    np.save(work / "q4k_values.npy", values)
    np.save(work / "q4k_blocks.npy", quantize_q4_k(values))
    job["q4k"] = {"values": str(work / "q4k_values.npy"), "blocks": str(work / "q4k_blocks.npy")}
    hf_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    llama: dict[str, Any] = {}
    if args.llama_python:
        done = subprocess.run([args.llama_python, "-c", WORKER], input=json.dumps(job),
                              capture_output=True, text=True, check=True)  # fmt: skip
        llama = json.loads(done.stdout.strip().splitlines()[-1])
        for row in rows:
            ran = llama[row["file"]]
            ours = row["_answers"]
            row["llama_cpp"] = {
                "tokenization_equal": _share(ran["tokenized"], hf_ids),
                "max_rel_logits_vs_torch_gguf": round(ran["max_rel_logits"], 5),
                "max_abs_logits_vs_torch_gguf": round(ran["max_abs_logits"], 5),
                "greedy_answers_equal": _share(ran["greedy"], ours),
                "recall_em": _recall(tokenizer, ran["greedy"], items),
            }
            print(f"  llama.cpp {row['file']}: {row['llama_cpp']}", flush=True)
    for row in rows:
        del row["_answers"]
    result = {
        "question": "llama.cpp on knowpress GGUF files vs their dequantized PyTorch scoring",
        "config": vars(args)
        | {"out": Path(args.out).name, "llama_python": bool(args.llama_python)},
        "model": Path(teacher).name,
        "teacher_bf16_bytes": reference_bytes,
        "teacher_recall_em": _recall(tokenizer, teacher_answers, items),
        "llama_cpp_python": llama.get("llama_cpp_python"),
        "q4k_identical_blocks_vs_ggml": llama.get("q4k_identical_blocks"),
        "q4k_blocks_compared": llama.get("q4k_blocks"),
        "rows": rows,
    }
    print(f"teacher recall EM {result['teacher_recall_em']:.3f}; Q4_K blocks identical to ggml: "
          f"{result['q4k_identical_blocks_vs_ggml']}")  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
