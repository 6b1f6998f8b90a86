"""Question: which distillation objective moves the most of a teacher's knowledge into a
student of half or a quarter of its parameters, for the same number of steps?

For each preset: students are width-pruned copies of the teacher (``student.make: width``,
MLP channels and heads kept at the ratio that gives ``--sizes`` of the teacher's parameters,
embeddings included), each trained by the distill stage's trainer for ``--steps`` steps of
``--batch`` sequences on the world's training text with one objective: ``sft`` (CE on the
labels only), ``forward_kl``, ``reverse_kl``, ``gjsd`` (β=0.5), ``taid``, ``gkd`` (GJSD with
on-policy batches at λ=0.5). The untrained pruned student is scored too (``pruned``). Every
student is scored by knowpress's evaluation against the teacher: per-task retention, worst
task, KL, top-1, bits per student parameter.

Writes ``benchmarks/results/distill.json`` (rows kept per preset) and ``distill.png``.

    python benchmarks/distill.py [PRESET ...] [--sizes 0.5 0.25] [--steps 600] [--batch 32]
        [--methods sft forward_kl ...] [--max-items N]

Delta-KD (``delta_kd``: target z_student_base + (z_sft − z_base), λ=0.5 CE) needs the teacher
before its QA data, which only ``bios-dense-tiny-sft`` has (``bios-dense-tiny-base``):
``python benchmarks/distill.py bios-dense-tiny-sft --methods forward_kl delta_kd --sizes 0.5``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_io import grouped_bars, save_figure, write_presets
from scoring import Scorer

from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.formats.sizes import bf16_bytes, parameter_count
from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.students import StudentSpec, make_student
from knowpress.methods.distill.trainer import OnPolicySpec, Trainer, TrainSpec
from knowpress.pipeline.distill_data import DistillData
from knowpress.teachers import build_teacher
from knowpress.teachers.training import training_threads
from knowpress.worlds import PRESETS, load_world

RESULTS = Path(__file__).parent / "results" / "distill.json"
DEFAULT_PRESETS = ["bios-dense-capacity", "bios-dense-small"]
METHODS: dict[str, tuple[dict[str, Any], float, float]] = {  # loss, sft weight, λ
    "sft": ({"name": "ce"}, 0.0, 0.0),
    "forward_kl": ({"name": "forward_kl"}, 0.0, 0.0),
    "reverse_kl": ({"name": "reverse_kl"}, 0.0, 0.0),
    "gjsd": ({"name": "gjsd", "beta": 0.5}, 0.0, 0.0),
    "taid": ({"name": "taid"}, 0.0, 0.0),
    "gkd": ({"name": "gjsd", "beta": 0.5}, 0.0, 0.5),
    # Delta-KD needs the teacher before its QA data: only presets in BASE_OF have one.
    "delta_kd": ({"name": "delta_kd", "teacher_base": {"world": "bios-dense-tiny-base"}}, 0.5, 0.0),
}
BASE_OF = {"bios-dense-tiny-sft": "bios-dense-tiny-base"}


def ratio_for(teacher: Any, share: float, calib: list[torch.Tensor]) -> tuple[float, int]:
    """The keep ratio (MLP channels and heads alike) whose student is closest to ``share``."""
    best = (1.0, parameter_count(teacher))
    target = share * parameter_count(teacher)
    for step in range(1, 41):
        r = step / 40
        spec = StudentSpec(make="width", mlp_keep=r, heads_keep=r)
        n = parameter_count(make_student(spec, teacher, calib[:1]))
        if abs(n - target) < abs(best[1] - target):
            best = (r, n)
    return best


def train_one(
    teacher: Any, pruned: Any, data: DistillData, method: str, args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    block, sft, rate = METHODS[method]
    loss = DISTILL_LOSSES.get(block["name"]).model_validate(block)
    spec = TrainSpec(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=20)
    on_policy = OnPolicySpec(rate=rate, max_new_tokens=16) if rate else None
    student = copy.deepcopy(pruned).requires_grad_(True)
    extra = None
    if method == "delta_kd":  # the stage's defaults: student base = the untrained student
        base, _ = load_model(build_teacher(block["teacher_base"]["world"]))
        extra = {"teacher_base": base, "student_base": copy.deepcopy(pruned)}
        extra = {k: m.eval().requires_grad_(False) for k, m in extra.items()}
    trainer = Trainer(student, teacher, loss, data, spec, on_policy, sft, None, method, extra)
    outcome = trainer.run(Progress())
    return student, {
        "train_seconds": outcome.train_seconds,
        "generate_seconds": outcome.generate_seconds,
        "final_loss": outcome.loss,
        "on_policy_steps": outcome.on_policy_steps,
    }


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = build_teacher(name, progress=True)
    scorer = Scorer(path, args.max_items)
    teacher, tokenizer = load_model(path)
    teacher.eval().requires_grad_(False)
    world = load_world(path)
    data = DistillData(world, tokenizer, None, args.batch, 128, seed=0)
    calib = [data.batch(i)[0] for i in range(4)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.sizes:
            ratio, n = ratio_for(teacher, share, calib)
            pruned = make_student(
                StudentSpec(make="width", mlp_keep=ratio, heads_keep=ratio), teacher, calib
            )
            fields = {
                "size": share,
                "keep_ratio": ratio,
                "student_parameters": n,
                "student_share": n / parameter_count(teacher),
            }
            methods = [m for m in args.methods if m != "delta_kd" or name in BASE_OF]
            for method in ["pruned", *methods]:
                start = time.perf_counter()
                student, extra = (
                    (pruned, {})
                    if method == "pruned"
                    else train_one(teacher, pruned, data, method, args)
                )
                out = Path(tmp) / f"{method}-{share}"
                save_model(student, tokenizer, out, dtype=torch.bfloat16)
                row = scorer.score(
                    out,
                    bf16_bytes(out),
                    time.perf_counter() - start,
                    method=method,
                    **fields,
                    **extra,
                )
                row["bits_per_student_parameter"] = row["scores"].get("bits", 0.0) / n
                rows.append(row)
                print(_line(row), flush=True)
    return {
        "preset": name,
        "preset_key": PRESETS.get(name).key(),
        "teacher": str(path),
        "teacher_parameters": parameter_count(teacher),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "max_items": args.max_items,
        "teacher_scores": {t: s.score for t, s in scorer.teacher.items()},
        "gated_tasks": scorer.gated,
        "rows": rows,
    }


def gkd_step_timing(name: str, args: argparse.Namespace, repeats: int = 5) -> dict[str, Any]:
    """Seconds of one on-policy GKD step (student generates ``max_new_tokens``, teacher and
    student score, GJSD(0.5) backward; no optimizer step) for ours and TRL's
    ``GKDTrainer.training_step`` (λ=1), on the same models, prompts and generation settings.
    Medians of ``repeats`` steps after one warm-up each."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from knowpress.methods.distill.batches import left_pad
    from knowpress.methods.distill.trainer import batch_loss, generate_batch

    path = build_teacher(name, progress=True)
    teacher, tokenizer = load_model(path)
    teacher.eval().requires_grad_(False)
    data = DistillData(load_world(path), tokenizer, None, args.batch, 128, seed=0)
    student = make_student(
        StudentSpec(make="width", mlp_keep=0.5, heads_keep=0.5), teacher, [data.batch(0)[0]]
    ).requires_grad_(True)
    prompts = data.prompts(0)
    op = OnPolicySpec(rate=1.0, max_new_tokens=args.gkd_tokens)
    loss = DISTILL_LOSSES.get("gjsd").model_validate({"name": "gjsd", "beta": 0.5})
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def ours(i: int) -> None:
        batch = generate_batch(student, prompts, op, pad, eos, seed=i)
        batch_loss(student, teacher, loss, batch, TrainSpec(batch_size=args.batch), 0.0, None)
        student.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = GKDConfig(
            output_dir=tmp,
            lmbda=1.0,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=args.gkd_tokens,
            per_device_train_batch_size=args.batch,
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
        trl = GKDTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_dict({"text": ["x"]}),
            data_collator=lambda rows: rows,
            processing_class=tokenizer,
        )
        ids, mask = left_pad(prompts, pad)
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.full_like(ids, -100),
            "prompts": ids,
            "prompt_attention_mask": mask,
        }

        trl.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it

        def theirs(i: int) -> None:
            torch.manual_seed(i)
            trl.training_step(trl.model, dict(inputs))
            trl.model.zero_grad(set_to_none=True)

        timings = {"ours": _median_seconds(ours, repeats), "trl": _median_seconds(theirs, repeats)}
    import trl as trl_package

    return {
        **timings,
        "ratio": timings["ours"] / timings["trl"],
        "batch": args.batch,
        "max_new_tokens": args.gkd_tokens,
        "trl_version": trl_package.__version__,
    }


def _median_seconds(step: Any, repeats: int) -> float:
    step(0)  # warm-up
    times = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _line(row: dict[str, Any]) -> str:
    return (
        f"  {row['size']:.2f} ({row['student_parameters']:,} params) {row['method']:11s} "
        f"worst {row['worst_retention']:.3f}, "
        + ", ".join(f"{t} {v:.3f}" for t, v in row["retention"].items())
        + f", kl {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
        f"bits/param {row['bits_per_student_parameter']:.3f}, {row['seconds']:.1f} s"
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    def draw(axes: list[Any]) -> None:
        for ax, result in zip(axes, results, strict=True):
            methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
            sizes = sorted({r["size"] for r in result["rows"]}, reverse=True)
            series = {m: [_recall(result, m, s) for s in sizes] for m in methods}
            grouped_bars(ax, [f"{s:.0%} of teacher" for s in sizes], series)
            ax.set_title(f"{result['preset']} ({result.get('steps', 0)} steps)")
            ax.set_ylabel("recall retention")

    save_figure(path, len(results), draw, width=6)


def _recall(result: dict[str, Any], method: str, size: float) -> float:
    rows = [r for r in result["rows"] if r["method"] == method and r["size"] == size]
    return rows[0]["retention"].get("recall", 0.0) if rows else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="delta_kd runs on presets with a base teacher (bios-dense-tiny-sft)",
    )
    parser.add_argument("--max-items", type=int)
    parser.add_argument("--gkd-tokens", type=int, default=32)
    parser.add_argument("--skip-training", action="store_true", help="only the GKD step timing")
    args = parser.parse_args()
    torch.set_num_threads(training_threads())
    fresh = []
    for name in args.presets:
        print(name)
        timing = gkd_step_timing(name, args)
        print(
            f"  one on-policy GKD step: ours {timing['ours']:.3f} s, TRL {timing['trl']:.3f} s, "
            f"ratio {timing['ratio']:.2f}"
        )
        result = {"preset": name, "preset_key": PRESETS.get(name).key(), "rows": []}
        if not args.skip_training:
            result = measure(name, args)
        result["gkd_step"] = timing
        fresh.append(result)
        write_presets(RESULTS, fresh, plot)


if __name__ == "__main__":
    main()
