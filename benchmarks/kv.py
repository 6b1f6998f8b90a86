"""Question: which KV-cache policy keeps what a teacher reads from its context, and what the
cache then costs, at 50%, 25% and 12.5% of the tokens (and 4/2 bits for the quantized ones)?

For each preset, on the teacher in float32 (the compute dtype on this CPU) and the same
items for every policy, each measured against the full cache in the same run:

- ``long_context`` EM per haystack size (the task's own sizes and items; the haystack is
  prefilled under the policy before the question, ``TorchRuntime.greedy(contexts=...)``),
  and its retention = EM / full-cache EM, per size and averaged; with ``--protocols ...
  prompt`` also with the whole prompt in one prefill (the policy sees the question: SnapKV's
  own protocol, kvpress's "prompt" split), reported as ``prompt_retention``;
- decode-time retention: the teacher recites a trained biography from its first words
  (the prompt is the bio up to its first value, ``--bio-tokens`` new tokens), scored as the
  share of the person's attribute values that appear in the recital, relative to the full
  cache: the cache is evicted/quantized while it generates;
- KL(full ‖ policy) per token on the longest haystack prompts, scored chunk by chunk through
  the policy's cache (``TorchRuntime.score_chunk``);
- KV bytes per token (``kv_bytes_per_token``: the cache's real bytes after a 512-token
  prefill, full-precision keys and values counted in ``--kv-dtype``, the deploy dtype:
  bfloat16 by default, whatever the float32 compute) and its ratio to the full cache in that
  dtype; ``kv_ratio_longest`` the same ratio on the
  longest haystack prompt itself (a quantized cache keeps a partial group in full
  precision, so it depends on the length);
- decode tokens/s relative to the full cache: the longest haystack prompts prefilled, then
  ``--speed-tokens`` tokens generated, timed alternately with the full cache (best of 3
  each), so a machine busy with other work slows both alike.

Writes ``benchmarks/results/kv.json`` (rows kept per preset) and ``kv.png`` (long_context
retention vs KV bytes relative to the full cache).

    python benchmarks/kv.py [PRESET ...] [--budgets 0.5 0.25 0.125] [--items 16]
        [--families eviction quantized compose] [--policy LABEL=JSON ...] [--only LABEL ...] [--add]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from results_io import earlier, save_figure, write_presets

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.metrics import normalize_answer
from knowpress.evaluate.tasks.long_context import LongContext
from knowpress.evaluate.tasks.qa import score_qa
from knowpress.formats.io import load_model
from knowpress.methods.kv import policy_from_json
from knowpress.runtimes.torch import TorchRuntime, dtype_bytes
from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS, load_world

RESULTS = Path(__file__).parent / "results" / "kv.json"
DEFAULT_PRESETS = ["bios-dense-small", "bios-moe-small"]
EVICTION = {
    "streaming": {"name": "streaming", "sinks": 4},
    "h2o": {"name": "h2o", "recent": 0.5},
    "snapkv": {"name": "snapkv", "window": 16, "kernel": 7},
    "rkv": {"name": "rkv", "window": 8, "buffer": 16},
    "head_budget": {
        "name": "head_budget",
        "floor": 0.3,
        "policy": {"name": "snapkv", "window": 16, "kernel": 7},
    },
}
QUANTIZED = {
    f"{name}{bits}": {"name": name, "bits": bits, "group_size": 32, "residual": 32,
                      **({"rank": 4, "outliers": 0.02} if name == "gear" else {})}
    for name in ("kivi", "gear") for bits in (4, 3, 2)
}  # fmt: skip
COMPOSED = {f"snapkv+kivi{bits}": ("snapkv", f"kivi{bits}") for bits in (4, 3, 2)}
COMPOSED |= {"h2o+kivi2": ("h2o", "kivi2")}


def configs(args: argparse.Namespace) -> list[tuple[str, float | None, dict[str, Any]]]:
    """(label, budget, policy block) for every measured policy, the full cache first."""
    out: list[tuple[str, float | None, dict[str, Any]]] = [("full", None, {"name": "full"})]
    if "quantized" in args.families:
        out += [(label, None, block) for label, block in QUANTIZED.items()]
    for budget in args.budgets:
        if "eviction" in args.families:
            out += [(label, budget, {**block, "budget": budget})
                    for label, block in EVICTION.items()]  # fmt: skip
        if "compose" in args.families:
            out += [(label, budget, {"name": "compose", "policies": [
                {**EVICTION[evict], "budget": budget}, QUANTIZED[store]]})
                for label, (evict, store) in COMPOSED.items()]  # fmt: skip
    for text in args.policy:
        label, _, block = text.partition("=")
        out.append((label, None, json.loads(block)))
    if args.only:
        out = [row for row in out if row[0] in {"full", *args.only}]
    return out


def bio_items(world: Any, n: int) -> list[tuple[str, list[str]]]:
    """(the first words of a trained bio up to its first value, the person's values)."""
    items = []
    for person, bio in zip(world.people[:n], world.training_bios()[:: world.config.bios_per_person],
                           strict=False):  # fmt: skip
        values = [v for a, v in person.values.items() if a != "pronoun"]
        first = min((bio.find(v), v) for v in values if v in bio)[0]
        items.append((bio[:first].strip(), values))
    return items


def recital(runtime: TorchRuntime, items: list[tuple[str, list[str]]], tokens: int) -> float:
    """Mean share of a person's values that the greedy recital contains."""
    texts = runtime.greedy([prompt for prompt, _ in items], tokens)
    found = [sum(normalize_answer(v) in normalize_answer(t) for v in values) / len(values)
             for t, (_, values) in zip(texts, items, strict=True)]  # fmt: skip
    return sum(found) / len(found)


def kl_to_full(runtime: TorchRuntime, full: list[torch.Tensor], ids: list[list[int]]) -> float:
    """Mean per-token KL(full ‖ policy) over ``ids``."""
    ours = runtime.next_token_logprobs(ids)
    total = sum(float((f.exp() * (f - o)).sum()) for f, o in zip(full, ours, strict=True))
    return total / sum(len(x) - 1 for x in ids)


def timed_generation(runtime: TorchRuntime, prompts: list[str], tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        ids = runtime.tokenizer(prompts, return_tensors="pt", padding=True)
        runtime.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=runtime.tokenizer.pad_token_id,
                               **runtime._cache())  # fmt: skip
    return time.perf_counter() - start


def speed_vs_full(model: Any, tok: Any, policy: Any, prompts: list[str], tokens: int) -> float:
    """Full-cache seconds / policy seconds for the same generation, best of 3 alternated."""
    ours, full = TorchRuntime(model, tok, kv_policy=policy), TorchRuntime(model, tok)
    previous, tok.padding_side = tok.padding_side, "left"
    try:
        times: dict[str, list[float]] = {"ours": [], "full": []}
        for _ in range(3):
            times["full"].append(timed_generation(full, prompts, tokens))
            times["ours"].append(timed_generation(ours, prompts, tokens))
    finally:
        tok.padding_side = previous
    return min(times["full"]) / min(times["ours"])


@torch.inference_mode()
def held_bytes(model: Any, policy: Any, ids: list[int], kv_dtype: str) -> int:
    """Bytes the policy's cache holds after prefilling ``ids`` (one prompt, no padding),
    full-precision keys and values in ``kv_dtype``."""
    cache = policy.make_cache(model)
    model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return policy.cache_bytes(cache, dtype_bytes(kv_dtype))


def measure_policy(model: Any, tok: Any, block: dict[str, Any], sizes: list[Any],
                   bios: list[Any], kl_ids: list[list[int]], full_lp: list[torch.Tensor] | None,
                   args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    policy = policy_from_json(block, "benchmark")
    runtime = TorchRuntime(model, tok, batch_size=args.batch, kv_policy=policy,
                           kv_dtype=args.kv_dtype)  # fmt: skip
    em, start = {}, time.perf_counter()
    for n, items, _ in sizes:
        em[n] = score_qa(runtime, items[: args.items]).score
    seconds = time.perf_counter() - start
    if "prompt" in args.protocols:  # the question in the same prefill as its haystack
        prompt_em = {n: score_qa(runtime, [replace(it, context=None)
                                           for it in items[: args.items]]).score
                     for n, items, _ in sizes}  # fmt: skip
    row = {"em": em, "seconds": round(seconds, 2),
           "bio_recital": recital(runtime, bios, args.bio_tokens),
           "kv_bytes_per_token": runtime.kv_bytes_per_token(),
           "kv_bytes_longest": held_bytes(model, policy, kl_ids[0], args.kv_dtype)}  # fmt: skip
    if "prompt" in args.protocols:
        row["prompt_em"] = prompt_em
    if full_lp is not None:
        row["kl"] = kl_to_full(runtime, full_lp, kl_ids)
    prompts = [it.prompt for it in sizes[-1][1][: args.kl_items]]
    row["speed_vs_full"] = speed_vs_full(model, tok, policy, prompts, args.speed_tokens)
    return row


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    model, tok = load_model(path)
    model.eval().requires_grad_(False)
    world = load_world(path)
    probe = TorchRuntime(model, tok)
    sizes = LongContext()._sizes(probe, world, 32)
    bios = bio_items(world, args.bios)
    longest = sizes[-1][1][: args.kl_items]
    kl_ids = [tok(it.prompt)["input_ids"] for it in longest]
    full_lp = probe.next_token_logprobs(kl_ids)
    rows, full = [], None
    for label, budget, block in configs(args):
        try:
            row = measure_policy(model, tok, block, sizes, bios, kl_ids, full_lp, args)
        except KnowpressError as exc:  # a policy this architecture cannot run: a row says why
            rows.append({"label": label, "budget": budget, "policy": block, "error": str(exc)})
            print(f"  {label:14s} {budget}: {exc}", flush=True)
            continue
        full = full or row
        row |= relative(row, full)
        rows.append({"label": label, "budget": budget, "policy": block, **row})
        print(_line(rows[-1]), flush=True)
    return {"preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
            "kv_dtype": args.kv_dtype, "items_per_size": args.items, "bios": args.bios,
            "bio_tokens": args.bio_tokens,
            "sizes": {str(n): longest for n, _, longest in sizes}, "rows": rows}  # fmt: skip


def relative(row: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Retention per size and averaged, decode retention, bytes and speed vs the full cache."""

    def mean_ratio(ours: dict[int, float], base: dict[int, float]) -> tuple[dict, float]:
        ratios = {n: (em / base[n] if base[n] else None) for n, em in ours.items()}
        kept = [v for v in ratios.values() if v is not None]
        return ratios, sum(kept) / len(kept)

    per_size, mean = mean_ratio(row["em"], full["em"])
    extra = {}
    if "prompt_em" in row:
        extra["prompt_retention"] = mean_ratio(row["prompt_em"], full["prompt_em"])[1]
    return {"retention": per_size, "long_context_retention": mean, **extra,
            "decode_retention": row["bio_recital"] / full["bio_recital"],
            "kv_ratio": row["kv_bytes_per_token"] / full["kv_bytes_per_token"],
            "kv_ratio_longest": row["kv_bytes_longest"] / full["kv_bytes_longest"]}  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    budget = "" if row["budget"] is None else f"{row['budget']:g}"
    sizes = " ".join(f"{n}:{v:.2f}" for n, v in row["retention"].items() if v is not None)
    prompt = f" prompt {row['prompt_retention']:.3f}" if "prompt_retention" in row else ""
    return (f"  {row['label']:14s} {budget:6s} lc {row['long_context_retention']:.3f} [{sizes}]"
            f"{prompt}"
            f" decode {row['decode_retention']:.3f} kl {row.get('kl', 0):.4f}"
            f" kv {row['kv_ratio']:.4f} ({1 / row['kv_ratio']:.1f}x;"
            f" longest prompt {1 / row['kv_ratio_longest']:.1f}x) speed"
            f" {row['speed_vs_full']:.2f}")  # fmt: skip


def plot(presets: list[dict[str, Any]], path: Path) -> None:
    """Per preset, long_context retention vs KV bytes: context then question, whole prompt."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    panels = [(p, key) for p in presets
              for key in ("long_context_retention", "prompt_retention")]  # fmt: skip

    def draw(axes: list[Any]) -> None:
        for ax, (preset, key) in zip(axes, panels, strict=True):
            groups: dict[str, list[tuple[float, float]]] = {}
            for row in preset["rows"]:
                if "error" not in row and key in row:
                    groups.setdefault(row["label"], []).append((row["kv_ratio"], row[key]))
            for i, (label, points) in enumerate(groups.items()):
                xs, ys = zip(*sorted(points), strict=True)
                marker = "^" if "+" in label else "s" if label[:4] in ("kivi", "gear") else "o"
                ax.plot(xs, ys, marker=marker, color=colors[i % len(colors)], label=label)
            ax.axhline(0.95, color="grey", ls=":", lw=1)
            ax.axvline(1 / 8, color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("KV bytes per token / full cache (log)")
            ax.set_ylabel("long_context retention")
            protocol = "context, then question" if key.startswith("long") else "whole prompt"
            ax.set_title(f"{preset['preset']}: {protocol}")

    save_figure(path, len(panels), draw, width=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.25, 0.125])
    parser.add_argument("--families", nargs="*", default=["eviction", "quantized", "compose"],
                        choices=["eviction", "quantized", "compose"])  # fmt: skip
    parser.add_argument("--items", type=int, default=16, help="long_context items per size")
    parser.add_argument("--bios", type=int, default=32, help="biographies recited")
    parser.add_argument("--bio-tokens", type=int, default=96, help="tokens per recital")
    parser.add_argument("--kl-items", type=int, default=8, help="longest prompts for the KL")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help='an extra policy row, e.g. kivi2r16=\'{"name": "kivi", ...}\'',
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="measure only these labels (and the full cache)",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the preset's earlier rows (with --families/--policy subsets)",
    )
    parser.add_argument("--speed-tokens", type=int, default=32, help="tokens timed per prompt")
    parser.add_argument(
        "--kv-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="the deploy dtype full-precision keys and values are counted in",
    )
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=["context", "prompt"],
        choices=["context", "prompt"],
        help="context is always measured",
    )
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = [measure(name, args) for name in args.presets]
    write_presets(RESULTS, fresh, plot, carry_rows if args.add else None)


def carry_rows(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    """``--add``: keep each preset's earlier rows that this run did not measure again (each
    is relative to the full cache of the run that measured it; same teacher key and KV
    dtype: rows from before ``kv_dtype`` counted float32 caches)."""
    for entry in fresh:
        old = earlier(previous, entry)
        if old is not None and old.get("kv_dtype", "float32") == entry["kv_dtype"]:
            seen = {(r["label"], r["budget"]) for r in entry["rows"]}
            entry["rows"] = [r for r in old["rows"] if (r["label"], r["budget"]) not in seen
                             ] + entry["rows"]  # fmt: skip


if __name__ == "__main__":
    main()
