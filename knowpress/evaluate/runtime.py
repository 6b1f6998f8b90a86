"""Runtimes: what evaluation talks to, so the same tasks score every artifact.

A runtime answers two questions: the greedy continuation of a batch of prompts, and the
per-sequence summed negative log-likelihood of texts. ``TorchRuntime`` wraps a transformers
causal LM; later runtimes (PyTorch + KV policy, ONNX Runtime session) implement the same
protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) and the number of scored tokens."""

    nats: float
    tokens: int


class Runtime(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...

    def nll(self, texts: Sequence[str]) -> list[NLL]: ...


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class TorchRuntime:
    """Greedy decoding and scoring with a transformers model (KV cache on, batched)."""

    name = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def _batches(self, texts: Sequence[str], side: str) -> Iterator[BatchEncoding]:
        """Tokenized batches padded on ``side`` (left for generation, right for scoring)."""
        tok = self.tokenizer
        previous, tok.padding_side = tok.padding_side, side
        self.model.eval()
        try:
            for start in range(0, len(texts), self.batch_size):
                yield tok(
                    list(texts[start : start + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=True,
                ).to(_device(self.model))
        finally:
            tok.padding_side = previous

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers, decoded without special tokens and cut at end-of-sequence."""
        tok, out = self.tokenizer, []
        for batch in self._batches(prompts, "left"):  # decoder-only: pad on the left
            generated = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                use_cache=True,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            out.extend(tok.batch_decode(new_tokens, skip_special_tokens=True))
        return [text.strip() for text in out]

    @torch.inference_mode()
    def nll(self, texts: Sequence[str]) -> list[NLL]:
        """Summed next-token NLL per text (the first token is context, not scored)."""
        out = []
        for batch in self._batches(texts, "right"):
            logits = self.model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            logp = torch.log_softmax(logits, dim=-1)
            token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_nll = token_nll.masked_fill(~mask, 0.0)
            for row, row_mask in zip(token_nll, mask, strict=True):
                out.append(NLL(float(row.sum()), int(row_mask.sum())))
        return out


def perplexity(nlls: Sequence[NLL]) -> float:
    """exp(total nats / total tokens) over a corpus."""
    tokens = sum(n.tokens for n in nlls)
    if tokens == 0:
        raise ValueError("perplexity of an empty corpus")
    return math.exp(sum(n.nats for n in nlls) / tokens)
