"""Question: how much of a teacher's in-context reading do NVIDIA kvpress's presses keep at
50%, 25% and 12.5% of the context's KV pairs, scored by knowpress's own evaluation?

kvpress pins ``transformers < 5.3`` (knowpress runs a newer one), so its presses run in a
separate venv through ``external/kvpress_run.py``; this script (main venv) builds the
``long_context`` items of the preset's world at the task's haystack sizes
(``LongContext._sizes``: doubling bios while prompt + answer fit, then the largest that fits),
the first ``--items`` of each, tokenizes them exactly as knowpress's runtime does (the whole
prompt with ``add_special_tokens=True``), hands kvpress those token ids, and scores the
answers with ``exact_match`` (``score_qa``'s normalisation), per haystack size, as retention
against kvpress's own no-press run. knowpress's full-cache EM on the same items
(``TorchRuntime.greedy``) is recorded beside it as a check that both read the same teacher.

Two splits of each prompt (``--splits``):

- ``context`` (kvpress's protocol): the press compresses the context's prefill (BOS +
  haystack); the question is then decoded over that cache, uncompressed, like the answer.
- ``prompt`` (question-aware): the press compresses the prefill of the whole prompt but its
  last token (``:`` of ``A:``), which starts decoding; a question-aware prefill, as
  knowpress's runtime does when a KV policy sees the whole prompt at once.

kvpress's ``compression_ratio`` is the fraction of the prefilled KV pairs REMOVED, so
``--ratios 0.5 0.75 0.875`` are budgets of 50%, 25%, 12.5%. Writes
``benchmarks/results/kvpress.json`` (rows kept per preset) and ``kvpress.png``.

    python benchmarks/kvpress_compare.py [PRESET ...] [--items 16] [--venv /work/kvpress-venv]
        [--ratios 0.5 0.75 0.875] [--splits context prompt] [--snapkv-window 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from results_io import save_figure, write_presets

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.metrics import exact_match
from knowpress.evaluate.tasks.long_context import DEFAULT_ITEMS, LongContext
from knowpress.evaluate.tasks.qa import answer_budget
from knowpress.runtimes.loader import load_runtime
from knowpress.teachers import build_teacher
from knowpress.worlds import PRESETS, load_world

RESULTS = Path(__file__).parent / "results" / "kvpress.json"
RUNNER = Path(__file__).parent / "external" / "kvpress_run.py"
DEFAULT_VENV = Path(__file__).resolve().parents[2] / "kvpress-venv"
INSTALL = (
    'python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 "transformers<5.3" kvpress'
)
PRESSES = ["SnapKVPress", "StreamingLLMPress", "KnormPress", "ExpectedAttentionPress"]


def venv_python(venv: Path) -> Path:
    """The kvpress venv's python, or SystemExit with the one command that creates it."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import kvpress"] if python.is_file() else None
    if probe is None or subprocess.run(probe, capture_output=True).returncode != 0:
        raise SystemExit(f"no kvpress venv at {venv}; create it with: {INSTALL.format(venv=venv)}")
    return python


def world_of(path: Path, preset: str) -> Any:
    """The teacher's world; when ``load_world`` refuses its recorded fingerprint, the
    preset's world (the teacher folder is keyed by the preset, so the same config), said so."""
    try:
        return load_world(path)
    except KnowpressError as err:
        print(f"load_world({path.name}) refused ({err}); using preset {preset}'s world config")
        return load_world(preset)


def haystacks(runtime: Any, world: Any, per_size: int) -> list[tuple[int, list[Any], int]]:
    """(bios, first ``per_size`` items, answer budget) per size the task scores, from the
    items the task draws by default (``DEFAULT_ITEMS`` per size)."""
    sizes = LongContext()._sizes(runtime, world, DEFAULT_ITEMS)
    return [(n, items[:per_size], answer_budget(runtime, items[:per_size]))
            for n, items, _ in sizes]  # fmt: skip


def split_ids(tokenizer: Any, item: Any, split: str) -> tuple[list[int], list[int]]:
    """(prefilled ids, decoded-from ids) of the prompt as knowpress tokenizes it: the whole
    prompt with ``add_special_tokens=True``, cut after the context or before the last token."""
    prompt = tokenizer(item.prompt, add_special_tokens=True)["input_ids"]
    if split == "prompt":
        return prompt[:-1], prompt[-1:]
    context = tokenizer(item.context, add_special_tokens=True)["input_ids"]
    if prompt[: len(context)] != context or len(context) >= len(prompt):
        raise ValueError(f"the context's tokens are not a prefix of the prompt's: {item.prompt!r}")
    return context, prompt[len(context) :]


def runner_input(teacher: Path, tokenizer: Any, sizes: list[Any], split: str,
                 args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """The JSON ``kvpress_run.py`` reads: every size's items in order, then the presses."""
    items = []
    for _, group, budget in sizes:
        for item in group:
            context_ids, question_ids = split_ids(tokenizer, item, split)
            items.append({"context": item.context, "question": item.question,
                          "max_new_tokens": budget, "context_ids": context_ids,
                          "question_ids": question_ids})  # fmt: skip
    kwargs = {"SnapKVPress": {"window_size": args.snapkv_window}}
    presses = [{"name": name, "ratios": args.ratios, "kwargs": kwargs.get(name, {})}
               for name in args.presses]  # fmt: skip
    return {"teacher": str(teacher), "threads": args.threads, "items": items, "presses": presses}


def run_kvpress(python: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``kvpress_run.py`` on ``spec`` in the kvpress venv; its JSON, or SystemExit."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(spec))
        run = subprocess.run([str(python), str(RUNNER), str(inp), str(out)], text=True,
                             stdout=sys.stdout, stderr=subprocess.PIPE)  # fmt: skip
        if run.returncode != 0:
            tail = "\n".join(run.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"kvpress_run.py failed (exit {run.returncode}):\n{tail}")
        return json.loads(out.read_text())


def em_per_size(answers: list[str], sizes: list[Any]) -> list[float]:
    """Mean exact match per haystack size of answers given in ``runner_input``'s item order."""
    out, start = [], 0
    for _, group, _ in sizes:
        chunk = answers[start : start + len(group)]
        if len(chunk) != len(group):
            raise ValueError(f"kvpress returned {len(answers)} answers for fewer items")
        out.append(sum(exact_match(a, it.answer) for a, it in zip(chunk, group, strict=True))
                   / len(group))  # fmt: skip
        start += len(group)
    if start != len(answers):
        raise ValueError(f"kvpress returned {len(answers)} answers for {start} items")
    return out


def retention(em: float, base: float) -> float | None:
    return em / base if base > 0 else None


def score_runs(result: dict[str, Any], sizes: list[Any], split: str) -> list[dict[str, Any]]:
    """One row per run and haystack size (EM, retention vs the no-press run), plus ``mean``
    (the long_context score: mean EM over the sizes) per run."""
    runs = result["runs"]
    base = next(r for r in runs if r["press"] is None)
    base_em = em_per_size(base["answers"], sizes)
    base_mean = sum(base_em) / len(base_em)
    rows = []
    for run in runs:
        ems = em_per_size(run["answers"], sizes)
        common = {"split": split, "press": run["press"] or "none",
                  "compression_ratio": run["compression_ratio"],
                  "kv_budget": 1 - run["compression_ratio"], "seconds": round(run["seconds"], 3),
                  "context_tokens": run["context_tokens"]}  # fmt: skip
        for (n, group, _), em, b in zip(sizes, ems, base_em, strict=True):
            rows.append({**common, "bios": n, "items": len(group), "em": em,
                         "retention": retention(em, b)})  # fmt: skip
        mean = sum(ems) / len(ems)
        rows.append({**common, "bios": "mean", "items": sum(len(g) for _, g, _ in sizes),
                     "em": mean, "retention": retention(mean, base_mean)})  # fmt: skip
    return rows


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.3f}"


def print_table(rows: list[dict[str, Any]], sizes: list[Any]) -> None:
    """press × budget lines, EM / retention per haystack size and their mean."""
    cols = [*(str(n) for n, _, _ in sizes), "mean"]
    print(f"{'split':8}{'press':24}{'budget':>7}  " + "  ".join(f"{c + ' bios':>13}" for c in cols)
          + f"{'seconds':>9}")  # fmt: skip
    keys = dict.fromkeys((r["split"], r["press"], r["kv_budget"]) for r in rows)
    for split, press, budget in keys:
        mine = {str(r["bios"]): r for r in rows
                if (r["split"], r["press"], r["kv_budget"]) == (split, press, budget)}  # fmt: skip
        cells = "  ".join(f"{_fmt(mine[c]['em'])}/{_fmt(mine[c]['retention'])}" for c in cols)
        print(f"{split:8}{press:24}{budget:7.3f}  {cells}{mine['mean']['seconds']:9.1f}")
    print("cells: EM / retention (EM ratio vs the same split's no-press run)")


def size_info(tokenizer: Any, sizes: list[Any]) -> list[dict[str, Any]]:
    """Per haystack size: bios, items, answer budget and the longest prompt's tokens."""
    longest = [max(len(tokenizer(it.prompt)["input_ids"]) for it in g) for _, g, _ in sizes]
    return [{"bios": n, "items": len(g), "max_new_tokens": b, "prompt_tokens": t}
            for (n, g, b), t in zip(sizes, longest, strict=True)]  # fmt: skip


def measure(name: str, args: argparse.Namespace, python: Path) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    runtime = load_runtime(path)
    sizes = haystacks(runtime, world_of(path, name), args.items)
    greedy = runtime.greedy
    full = [a for _, group, budget in sizes
            for a in greedy([it.prompt for it in group], max_new_tokens=budget)]  # fmt: skip
    knowpress_em = em_per_size(full, sizes)
    rows, versions, tokenization = [], None, {}
    for split in args.splits:
        result = run_kvpress(python, runner_input(path, runtime.tokenizer, sizes, split, args))
        versions, tokenization[split] = result["versions"], result["tokenization"]
        rows += score_runs(result, sizes, split)
        print_table([r for r in rows if r["split"] == split], sizes)
    pairs = zip(sizes, knowpress_em, strict=True)
    print("knowpress full-cache EM: " + ", ".join(f"{n} bios {em:.3f}" for (n, _, _), em in pairs))
    return {"preset": name, "preset_key": PRESETS.get(name).key(), "teacher": str(path),
            "versions": versions, "tokenization_same_as_kvpress_pipeline": tokenization,
            "sizes": size_info(runtime.tokenizer, sizes),
            "knowpress_full_em": dict(zip([str(n) for n, _, _ in sizes], knowpress_em,
                                          strict=True)),
            "snapkv_window": args.snapkv_window, "rows": rows}  # fmt: skip


def plot(presets: list[dict[str, Any]], path: Path) -> None:
    """Retention (mean over haystack sizes) vs KV budget: a colour per press, a line style
    per split (solid: context, kvpress's protocol; dashed: prompt, question-aware)."""

    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, presets, strict=True):
            rows = [r for r in result["rows"] if r["bios"] == "mean" and r["press"] != "none"]
            presses = list(dict.fromkeys(r["press"] for r in rows))
            for split, press in dict.fromkeys((r["split"], r["press"]) for r in rows):
                mine = sorted((r["kv_budget"], _nan(r["retention"])) for r in rows
                              if (r["split"], r["press"]) == (split, press))  # fmt: skip
                ax.plot(*zip(*mine, strict=True), marker="o", color=f"C{presses.index(press)}",
                        linestyle="-" if split == "context" else "--",
                        label=f"{press} ({split})")  # fmt: skip
            budgets = sorted({r["kv_budget"] for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [f"{b:.1%}" for b in budgets])
            ax.set_xlabel("KV budget (share of prefilled tokens kept)")
            ax.set_ylabel("long_context EM retention vs no press")
            ax.set_title(f"kvpress {result['versions']['kvpress']} on {result['preset']}",
                         fontsize=9)  # fmt: skip

    save_figure(path, len(presets), draw, width=6)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["bios-dense-small"])
    parser.add_argument("--items", type=int, default=16, help="items per haystack size")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--presses", nargs="+", default=PRESSES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    parser.add_argument("--splits", nargs="+", choices=["context", "prompt"],
                        default=["context", "prompt"])  # fmt: skip
    parser.add_argument(
        "--snapkv-window",
        type=int,
        default=16,
        help="SnapKVPress window_size (kvpress's 64 exceeds a 1-bio context)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    python = venv_python(args.venv)
    write_presets(RESULTS, [measure(name, args, python) for name in args.presets], plot)


if __name__ == "__main__":
    main()
