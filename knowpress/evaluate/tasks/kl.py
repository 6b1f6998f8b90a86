"""``kl``: how far the model's next-token distributions are from the reference's.

Score = mean over scored positions of ``KL(p_ref ‖ p_model) = Σ_v p(v) (log p(v) − log q(v))``
(nats per token; lower is better, 0 = the reference's distribution). Extras: ``kl_p99`` (the
99th percentile of per-position KL: the tail a mean hides), ``top1`` (share of positions where
the model's most likely next token is the reference's), each also per source.

Two sources, both tokenized once by the reference run and kept in its state, so every row is
scored on the same token ids:

- ``text``: held-out text (the world's, or ``evaluate.text``) cut into windows of at most
  ``min(max_positions, 256)`` tokens, at most ``MAX_TOKENS`` tokens in all;
- ``continuation``: ``CONTINUATIONS`` sequences the reference samples (temperature 1, seed
  ``SEED``, end-of-sequence suppressed) after the first ``PROMPT_TOKENS`` tokens of held-out
  texts, ``CONTINUATION_TOKENS`` new tokens each, scored on the sampled tokens only: a model
  that is close on short prompts and drifts after ~30 generated tokens shows it here.

Flips on text (``flips/lost``, ``flips/gained``): on the ``text`` windows, the share of
positions where the reference's most likely next token is the text's actual next token and
the model's is not (lost), and the reverse (gained): the token-level analogue of QA flips.

Per sequence (window or continuation) the run keeps ``kl_sum``, ``positions``, ``top1_hits``
and, for text windows, ``text_positions``, ``lost``, ``gained`` (``items``, statistic ``kl``):
the report's intervals resample sequences, not positions, since the positions of one
sequence are not independent.

``max_items`` caps the windows and the continuations. The reference's distribution at each
position is kept as its top ``TOP_K`` tokens plus one bucket for the rest; grouping never
increases KL, so the score is exact when the vocabulary has at most ``TOP_K`` tokens and
otherwise a lower bound that misses at most what falls in the rest bucket; ``top1`` is exact.

Not a retention: the gate bounds it directly (``gate: {max_kl: 0.05, min_top1: 0.95}``). For a
sense of scale, llama.cpp's KL tool on an 8B model: Q8_0 0.00024 nats / top-1 99.2%, Q5_K_M
0.0047 / 96.5%, Q3_K_M 0.051 / 89.6%.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from knowpress.evaluate.tasks.base import TASKS, State, Task, TaskResult

if TYPE_CHECKING:
    from knowpress.runtimes.torch import Runtime
    from knowpress.worlds import World

TOP_K = 64
MAX_TOKENS = 50_000
WINDOW = 256
CONTINUATIONS = 16
PROMPT_TOKENS = 16
CONTINUATION_TOKENS = 128
SEED = 0
_CHUNK_BYTES = 256 * 2**20  # float32 logits held at once while scoring
SOURCES = ("text", "continuation")
ITEM_COLUMNS = ("kl_sum", "positions", "top1_hits", "text_positions", "lost", "gained")


def windows(texts_ids: Sequence[Sequence[int]], width: int, budget: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``width`` tokens, ``budget`` tokens in all."""
    out: list[list[int]] = []
    left = budget
    for ids in texts_ids:
        for start in range(0, len(ids), width):
            piece = list(ids[start : start + width])[:left]
            if len(piece) >= 2:
                out.append(piece)
                left -= len(piece)
            if left < 2:
                return out
    return out


def position_kl(
    logq: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor
) -> torch.Tensor:
    """Per-position ``KL(p ‖ q)`` with ``p`` given as its top tokens plus a rest bucket.

    ``logq`` ``[P, V]`` log-probabilities of the model; ``top_ids``/``top_logp`` ``[P, K]``
    the reference's top tokens; ``tail_logp`` ``[P]`` the log of the reference's remaining
    mass (``-inf`` when K covers the vocabulary). Returns ``[P]`` nats.
    """
    logq_top = logq.gather(-1, top_ids.long())
    kl = (top_logp.exp() * (top_logp - logq_top)).sum(-1)
    rest = logq.scatter(-1, top_ids.long(), float("-inf")).logsumexp(-1)
    has_tail = torch.isfinite(tail_logp)
    tail = torch.where(has_tail, tail_logp.exp() * (tail_logp - rest), torch.zeros_like(kl))
    return kl + tail


def _logprob_chunks(runtime: Runtime, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``runtime.next_token_logprobs`` in chunks that bound the logits held at once."""
    vocab = max(len(runtime.tokenizer), 1)
    longest = max((len(s) for s in sequences), default=1)
    per_call = max(1, _CHUNK_BYTES // (4 * vocab * longest))
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), per_call):
        out.extend(runtime.next_token_logprobs(sequences[start : start + per_call]))
    return out


@TASKS.register("kl")
class KL(Task):
    name = "kl"
    metric = "kl_nats_per_token"
    higher_is_better = False
    relative = False
    needs_facts = False
    max_tokens = max(WINDOW, PROMPT_TOKENS + CONTINUATION_TOKENS)
    summary = "KL(reference || model) per token on held-out text and reference samples, top-1"
    paper = "Dutta et al. 2024 (Accuracy is not all you need), arXiv:2407.09141"

    def unsupported(self, world: World) -> str | None:
        return None if world.heldout_texts() else "this world has no held-out text"

    def run(
        self, runtime: Runtime, world: World, max_items: int | None, reference: State | None = None
    ) -> TaskResult:
        if reference is None:
            return self._reference_run(runtime, world, max_items)
        extra: dict[str, float] = {}
        every: list[torch.Tensor] = []
        items: dict[str, list[float]] = {name: [] for name in ITEM_COLUMNS}
        for source in SOURCES:
            kls, columns = self._compare(runtime, reference, source)
            every.append(kls)
            for name in ITEM_COLUMNS:
                items[name] += columns[name]
            if kls.numel():
                extra[f"kl/{source}"] = float(kls.mean())
                extra[f"top1/{source}"] = sum(columns["top1_hits"]) / kls.numel()
        per_position = torch.cat(every)
        extra["kl_p99"] = float(torch.quantile(per_position.double(), 0.99))
        extra["top1"] = sum(items["top1_hits"]) / per_position.numel()
        extra["positions"] = float(per_position.numel())
        extra.update(_text_flips(items))
        return TaskResult(
            float(per_position.mean()), per_position.numel(), extra, items=items, statistic="kl"
        )

    def _reference_run(self, runtime: Runtime, world: World, max_items: int | None) -> TaskResult:
        tokenizer = runtime.tokenizer
        texts_ids = tokenizer(list(world.heldout_texts()))["input_ids"]
        width = min(runtime.max_positions, WINDOW)
        budget = getattr(world, "max_tokens", None) or MAX_TOKENS
        text = windows(texts_ids, width, budget)[:max_items]
        prompts = [ids[:PROMPT_TOKENS] for ids in texts_ids if len(ids) >= PROMPT_TOKENS]
        prompts = prompts[: min(CONTINUATIONS, max_items or CONTINUATIONS)]
        new = min(CONTINUATION_TOKENS, runtime.max_positions - PROMPT_TOKENS)
        samples = runtime.sample(prompts, new, SEED) if prompts and new > 0 else []
        state: State = {}
        sources = (("text", text, 0), ("continuation", samples, PROMPT_TOKENS - 1))
        for source, sequences, first in sources:
            state.update(self._targets(runtime, source, sequences, first))
        positions = sum(int(state[f"{s}/tail_logp"].numel()) for s in SOURCES)
        extra = {"kl_p99": 0.0, "top1": 1.0, "positions": float(positions)}
        items = _self_items(text, samples, PROMPT_TOKENS - 1)
        extra.update(_text_flips(items))
        # KL(p || p) = 0, top-1 always agrees, nothing flips
        return TaskResult(0.0, positions, extra, state=state, items=items, statistic="kl")

    def _targets(
        self, runtime: Runtime, source: str, sequences: list[list[int]], first: int
    ) -> State:
        """The reference's top tokens at every scored position of ``sequences``."""
        tops, logps, tails = [], [], []
        for logp in _logprob_chunks(runtime, sequences):
            scored = logp[first:]
            k = min(TOP_K, scored.shape[-1])
            values, ids = scored.topk(k, dim=-1)
            tails.append(scored.scatter(-1, ids, float("-inf")).logsumexp(-1))
            tops.append(ids.to(torch.int32))
            logps.append(values)
        flat = [token for seq in sequences for token in seq]
        k = tops[0].shape[-1] if tops else 1
        return {
            f"{source}/ids": torch.tensor(flat, dtype=torch.int32),
            f"{source}/lengths": torch.tensor([len(s) for s in sequences], dtype=torch.int32),
            f"{source}/first": torch.tensor([first], dtype=torch.int32),
            f"{source}/top_ids": torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.int32),
            f"{source}/top_logp": torch.cat(logps) if logps else torch.zeros(0, k),
            f"{source}/tail_logp": torch.cat(tails) if tails else torch.zeros(0),
        }

    def _compare(
        self, runtime: Runtime, reference: State, source: str
    ) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Per-position KL against the reference on one source, and per-sequence columns
        (``ITEM_COLUMNS``; flips only on ``text``, where the next token is the text's own)."""
        flat = reference[f"{source}/ids"].tolist()
        sequences, start = [], 0
        for length in reference[f"{source}/lengths"].tolist():
            sequences.append(flat[start : start + length])
            start += length
        first = int(reference[f"{source}/first"][0])
        top_ids, top_logp = reference[f"{source}/top_ids"], reference[f"{source}/top_logp"]
        tail = reference[f"{source}/tail_logp"]
        kls, offset = [], 0
        columns: dict[str, list[float]] = {name: [] for name in ITEM_COLUMNS}
        for sequence, logq in zip(sequences, _logprob_chunks(runtime, sequences), strict=True):
            scored = logq[first:]
            rows = slice(offset, offset + scored.shape[0])
            kl = position_kl(scored, top_ids[rows], top_logp[rows], tail[rows])
            kls.append(kl)
            mine, theirs = scored.argmax(-1), top_ids[rows, 0].long()
            columns["kl_sum"].append(float(kl.double().sum()))
            columns["positions"].append(float(scored.shape[0]))
            columns["top1_hits"].append(float((mine == theirs).sum()))
            lost, gained, counted = 0.0, 0.0, 0.0
            if source == "text":
                actual = torch.tensor(sequence[first + 1 :], dtype=torch.long)
                lost = float(((theirs == actual) & (mine != actual)).sum())
                gained = float(((mine == actual) & (theirs != actual)).sum())
                counted = float(actual.numel())
            columns["text_positions"].append(counted)
            columns["lost"].append(lost)
            columns["gained"].append(gained)
            offset += scored.shape[0]
        if offset != tail.numel():
            counts = f"the reference scored {tail.numel()} positions, this run {offset}"
            raise ValueError(f"kl: {counts}")
        return (torch.cat(kls) if kls else torch.zeros(0)), columns


def _self_items(
    text: Sequence[Sequence[int]], samples: Sequence[Sequence[int]], first: int
) -> dict[str, list[float]]:
    """The reference's own columns: no KL, every top-1 agrees, nothing flips."""
    positions = [float(len(s) - 1) for s in text] + [float(len(s) - 1 - first) for s in samples]
    text_positions = [float(len(s) - 1) for s in text] + [0.0] * len(samples)
    zeros = [0.0] * len(positions)
    return {
        "kl_sum": zeros, "positions": positions, "top1_hits": list(positions),
        "text_positions": text_positions, "lost": list(zeros), "gained": list(zeros),
    }  # fmt: skip


def _text_flips(items: dict[str, list[float]]) -> dict[str, float]:
    """``flips/lost`` and ``flips/gained`` over the text windows' positions."""
    counted = sum(items["text_positions"])
    if not counted:
        return {}
    lost, gained = sum(items["lost"]) / counted, sum(items["gained"]) / counted
    return {"flips/lost": lost, "flips/gained": gained}
