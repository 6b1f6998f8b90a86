"""Train a tiny teacher (dense Llama-style or sparse MoE) until it has memorised a world.

Data: epoch ``e`` = every ``world.training_once()`` text (bios, company facts) once, that
epoch's fresh in-context passages (bios + questions + answers; ``in_context_loss`` says
whether the bios carry loss) once, and every trained QA string ``qa_repeat`` times,
shuffled; each text is ``<s> text </s>`` (the ``</s>`` teaches generation to stop after an
answer); ``copy_examples`` synthetic copy sequences join the mix when set. Batches are
length-bucketed (``EpochBatches``). Loss: mean next-token
cross-entropy over the labelled tokens (never pads). All randomness comes from
``train.seed`` through local ``random.Random`` streams and a forked torch RNG, so global
RNG state is left untouched, and a run resumed from a checkpoint (``train_state``) ends
bit-identical to an uninterrupted one.

Threads: training runs with ``training_threads()`` torch threads (restored afterwards). A
model this small gains ~1.2x from a second thread on an idle 2-core machine, but when
another torch process shares the cores, OpenMP spin-waiting made a 2-thread run ~90x
slower (measured); so by default we use a quarter of the cores, at least one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowpress.core.device import resolve_device
from knowpress.core.train_state import TrainState, load_state, save_state
from knowpress.methods.distill.batches import Example, collate, encode_texts
from knowpress.runtimes.torch import TorchRuntime
from knowpress.worlds.generator import Passage, QAItem, World
from knowpress.worlds.presets import ARCHITECTURES, Preset, TrainConfig

_BUCKET_BATCHES = 16
CHECKPOINT_SECONDS = 60.0  # how often a resumable run saves its state


@dataclass(frozen=True)
class TrainResult:
    """What training produced: the model and the numbers recorded in ``knowpress_world.json``."""

    model: PreTrainedModel
    steps: int
    final_loss: float
    seconds: float
    recall: float
    scores: dict[str, float]  # every applicable knowledge task, scored after training


def training_threads() -> int:
    """``$KNOWPRESS_TRAIN_THREADS`` if set, else max(1, cpu_count // 4), capped by torch's."""
    env = os.environ.get("KNOWPRESS_TRAIN_THREADS")
    wanted = int(env) if env else max(1, (os.cpu_count() or 1) // 4)
    return max(1, min(wanted, torch.get_num_threads()))


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_model(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Random-init ``preset.architecture``'s causal LM from ``preset.model``, token ids filled in.

    ``llama`` -> ``LlamaForCausalLM``; ``mixtral`` / ``qwen2_moe`` / ``qwen3_moe`` -> the
    transformers sparse-MoE models (``ARCHITECTURES`` in presets.py).
    """
    import transformers

    config_name, model_name = ARCHITECTURES[preset.architecture]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_cls(
        **preset.model,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# One training sequence: token ids and how many leading tokens carry no loss (context).
def encode_passages(
    passages: list[Passage], tokenizer: PreTrainedTokenizerBase, seq_len: int, mask_context: bool
) -> list[Example]:
    """``<s> context q1 a1 </s> q2 a2 </s> ...`` per passage, cut to ``seq_len`` tokens at a
    question boundary (a passage too long for even one question is cut mid-text).

    ``</s>`` after each answer is what generation stops on, as in the QA strings. With
    ``mask_context`` the ``<s> context`` prefix carries no loss.
    """
    if not passages:
        return []
    eos = tokenizer.eos_token_id
    contexts = tokenizer([p.context for p in passages], add_special_tokens=True)["input_ids"]
    examples: list[Example] = []
    for passage, context in zip(passages, contexts, strict=True):
        ids = list(context)
        qa = [f"{q.prompt} {q.answer}" for q in passage.questions]
        for row in tokenizer(qa, add_special_tokens=False)["input_ids"] if qa else []:
            if len(ids) + len(row) + 1 > seq_len:
                break
            ids += [*row, eos]
        ids = ids[:seq_len]
        examples.append((ids, min(len(context), len(ids)) if mask_context else 0))
    return examples


def copy_examples(
    tokenizer: PreTrainedTokenizerBase, n: int, span: tuple[int, int], rng: random.Random
) -> list[Example]:
    """``n`` sequences ``<s> w1..wk . w1..wk </s>``, k ~ U[span], words uniform over the
    tokenizer's non-special vocabulary; the loss is on the second copy and ``</s>`` only.

    Synthetic copying is the fastest way to grow induction heads (Olsson et al. 2022,
    arXiv:2209.11895); without it a CPU-sized teacher learns to copy two-valued answers
    (pronouns) from a passage but not names of cities, universities or employers.
    """
    if n == 0:
        return []
    separator = tokenizer.convert_tokens_to_ids(".")
    if separator is None or separator == tokenizer.unk_token_id:
        raise ValueError("train.copy_examples needs '.' in the tokenizer's vocabulary")
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special and i != separator]
    examples: list[Example] = []
    for _ in range(n):
        row = [rng.choice(words) for _ in range(rng.randint(*span))]
        prefix = [tokenizer.bos_token_id, *row, separator]
        examples.append(([*prefix, *row, tokenizer.eos_token_id], len(prefix)))
    return examples


class EpochBatches:
    """The batch schedule: ``batch(step)`` is a pure function of ``(world, train.seed, step)``.

    Epoch ``e`` = every ``world.training_once()`` text once, every passage of
    ``world.training_in_context(e)`` once (fresh each epoch; loss on every token or, with
    ``in_context_loss: questions``, on its questions and answers only), ``copy_examples``
    fresh copy sequences, every trained QA string ``qa_repeat`` times; shuffled with
    ``Random(f"knowpress-teacher:{seed}:{e}")``, then length-bucketed (sorted within
    windows of 16 batches, batches shuffled) so short QA strings are not padded to passage
    length. Every epoch has the same number of batches, so a resumed run finds its place
    without replaying earlier epochs.
    """

    def __init__(self, world: World, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig):
        self.world, self.tokenizer, self.cfg = world, tokenizer, cfg
        static = encode_texts(world.training_once(), tokenizer, cfg.seq_len)
        self.static: list[Example] = [(ids, 0) for ids in static]
        self.qa: list[Example] = [
            (ids, 0) for ids in encode_texts(world.training_qa(), tokenizer, cfg.seq_len)
        ]
        self._epoch, self._batches = -1, []
        self._load(0)
        self.per_epoch = len(self._batches)

    def _load(self, epoch: int) -> None:
        cfg = self.cfg
        passages = encode_passages(
            self.world.training_in_context(epoch),
            self.tokenizer,
            cfg.seq_len,
            mask_context=cfg.in_context_loss == "questions",
        )
        copies = copy_examples(
            self.tokenizer,
            cfg.copy_examples,
            cfg.copy_span,
            random.Random(f"knowpress-copy:{cfg.seed}:{epoch}"),
        )
        examples = self.static + passages + copies + self.qa
        n_once = len(examples) - len(self.qa)
        order = list(range(n_once)) + list(range(n_once, len(examples))) * cfg.qa_repeat
        rng = random.Random(f"knowpress-teacher:{cfg.seed}:{epoch}")
        rng.shuffle(order)
        window, batches = cfg.batch_size * _BUCKET_BATCHES, []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            batches.extend(
                chunk[j : j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)
            )
        rng.shuffle(batches)
        self._epoch, self._batches = epoch, [[examples[i] for i in b] for b in batches]

    def batch(self, step: int) -> list[Example]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._load(epoch)
        return self._batches[index]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def recall(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[QAItem]
) -> float:
    """Fraction of ``items`` whose greedy answer exactly matches (after normalisation)."""
    from knowpress.evaluate.tasks.qa import score_qa  # tasks import the world package

    if not items:
        return 0.0
    return score_qa(TorchRuntime(model, tokenizer, batch_size=128), items).score


def _progress(enabled: bool, name: str) -> Progress:
    return Progress(
        TextColumn(f"training teacher {name}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train_teacher(
    preset: Preset,
    world: World,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool = True,
    checkpoint: Path | None = None,
    device: str = "cpu",
    init: Path | None = None,
) -> TrainResult:
    """Train ``preset``'s model on ``world``'s epochs and score it on every applicable task.

    ``init``: a teacher directory (``train.init_from``'s) whose weights replace the fresh
    initialisation, so this run continues that teacher's training on this preset's data.

    With ``checkpoint``, the run state is saved there every ``CHECKPOINT_SECONDS`` and a run
    finding a checkpoint of the same preset key resumes from it (``train_state``). The
    model is initialised on the CPU (same weights on every device), trained and scored on
    ``device`` and returned on the CPU. The batch schedule does not depend on the device;
    float results do (kernels differ), so a GPU-built teacher is close to, not bit-equal
    to, a CPU-built one.
    """
    target = resolve_device(device, "--device")
    with _torch_threads(training_threads()):
        return _train(preset, world, tokenizer, progress, checkpoint, target, init)


def _train(
    preset: Preset,
    world: World,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool,
    checkpoint: Path | None,
    device: torch.device,
    init: Path | None = None,
) -> TrainResult:
    cfg, key = preset.train, preset.key()
    schedule = EpochBatches(world, tokenizer, cfg)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = make_model(preset, tokenizer)
    if init is not None:  # same config (build_teacher checked): the base's weights, float32
        base = type(model).from_pretrained(init, dtype=torch.float32)
        model.load_state_dict(base.state_dict())
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    state = TrainState()
    if checkpoint is not None:
        state = load_state(checkpoint, model, optimizer, key) or state
    segment_start = last_save = time.perf_counter()
    with _progress(progress, preset.name) as bar:
        task = bar.add_task(
            "train", total=cfg.steps, completed=state.step, loss=state.ema or float("nan")
        )
        for step in range(state.step, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            batch = collate(schedule.batch(step), tokenizer.pad_token_id)
            ids, mask, labels = (t.to(device) for t in batch)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            state.ema = value if state.ema is None else 0.9 * state.ema + 0.1 * value
            state.step = step + 1
            bar.update(task, advance=1, loss=state.ema)
            now = time.perf_counter()
            if checkpoint is not None and now - last_save >= CHECKPOINT_SECONDS:
                state.seconds += now - segment_start
                segment_start = last_save = now
                save_state(checkpoint, model, optimizer, state, key)
    model.eval()
    # training only (all segments of a resumed run); the scoring below is not counted
    seconds = state.seconds + time.perf_counter() - segment_start
    scores = teacher_scores(model, tokenizer, world)
    model.to("cpu")
    loss = float(state.ema or 0.0)
    return TrainResult(model, cfg.steps, loss, seconds, scores["recall"], scores)


def teacher_tasks(world: World) -> list[str]:
    """Knowledge tasks that apply to ``world``: long_context needs a haystack generator
    (synthetic worlds), two_hop needs composable facts (company facts, real-fact chains)."""
    tasks = ["recall", "paraphrase", "bits"]
    if hasattr(world, "haystack_items"):
        tasks.insert(2, "long_context")
    return [*tasks, "two_hop"] if world.two_hop_questions() else tasks


def teacher_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World
) -> dict[str, float]:
    """Headline score of every task in ``teacher_tasks(world)`` on all its items."""
    from knowpress.evaluate.evaluator import evaluate_runtime  # tasks import the world package

    runtime = TorchRuntime(model, tokenizer, batch_size=64)
    results = evaluate_runtime(runtime, world, teacher_tasks(world), max_items=None)
    return {name: result.score for name, result in results.items()}
