"""Runtimes: what evaluation talks to, so the same tasks score every artifact.

A runtime answers the questions tasks ask: the greedy continuation of a batch of prompts,
the per-sequence summed negative log-likelihood of texts, the context length
(``max_positions``), the logical parameter count and the KV-cache bytes per token at the
attached policy. Tasks ask only these, never the model behind them. ``TorchRuntime`` wraps a
transformers causal LM, optionally with a KV policy (``compress/kv``) whose cache is used in
prefill and in every decoding step; ``evaluate/loader.load_runtime`` builds the runtime an
artifact folder asks for (an ONNX Runtime session implements the same protocol).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from knowpress.runtimes.offload import execution_device, placement

if TYPE_CHECKING:
    from knowpress.methods.kv.base import KVPolicy

_MAX_SANE_POSITIONS = 10**7  # tokenizers without a limit report ~1e30
KV_PROBE_TOKENS = 512  # capped by max_positions; token budgets below it show their savings


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) and the number of scored tokens."""

    nats: float
    tokens: int


class Runtime(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def greedy(self, prompts: Sequence[str], max_new_tokens: int,
               contexts: Sequence[str | None] | None = None) -> list[str]:  # fmt: skip
        """Greedy answers. ``contexts[i]``, when given, is a prefix of ``prompts[i]`` that a
        KV policy compresses before the rest of the prompt (the question) is read."""
        ...

    def nll(self, texts: Sequence[str], exclude_token_ids: Sequence[int] = ()) -> list[NLL]: ...

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """For each token-id sequence (at most ``max_positions`` long), the log-softmax of
        the next-token distribution at every position but the last: ``[len - 1, vocab]``
        float32 on the CPU (row ``t`` predicts token ``t + 1``)."""
        ...

    def sample(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int
    ) -> list[list[int]]:
        """Each prompt followed by exactly ``max_new_tokens`` tokens sampled at temperature 1
        (end-of-sequence suppressed), reproducibly for ``seed``."""
        ...

    @property
    def max_positions(self) -> int: ...

    def parameter_count(self) -> int: ...

    def kv_bytes_per_token(self) -> float:
        """Bytes the cache holds after a ``KV_PROBE_TOKENS`` prefill, per token, its
        full-precision keys and values counted in ``describe()["kv_dtype"]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """``runtime``, ``device``, ``dtype``, ``kv_policy`` (name or None) and ``kv_dtype``
        (the dtype the deployed cache holds full-precision keys and values in), for reports;
        plus ``expert_skip`` when a policy skips MoE experts."""
        ...


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype named like ``bfloat16`` / ``torch.float32``."""
    return getattr(torch, name.removeprefix("torch.")).itemsize


def split_contexts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], contexts: Sequence[str | None]
) -> list[tuple[list[int], list[int]]]:
    """Each prompt's token ids as ``(context, question)``: the prompt's tokens up to where
    they stop matching its context's own tokens (at least one token is left for the
    question); both runtimes prefill the first part under the policy, then read the rest."""
    full = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    heads = tokenizer([c or "" for c in contexts], add_special_tokens=True)["input_ids"]
    out = []
    for ids, head, context in zip(full, heads, contexts, strict=True):
        n = 0
        while context and n < min(len(ids) - 1, len(head)) and ids[n] == head[n]:
            n += 1
        out.append((ids[:n], ids[n:]))
    return out


def _device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: an offloaded model's execution device, else its parameters' device."""
    dispatched = execution_device(model)
    if dispatched is not None:
        return dispatched
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class TorchRuntime:
    """Greedy decoding and scoring with a transformers model (KV cache on, batched).

    With ``kv_policy``, every generate call and every scoring pass gets a fresh cache from
    ``kv_policy.make_cache(model)``, so the policy acts in prefill and in decoding:

    - ``greedy`` with ``contexts`` prefills each context first (the policy compresses it),
      then generates from the question on (kvpress's context/question protocol);
    - scoring (``nll``, ``next_token_logprobs``) reads texts in chunks of ``score_chunk``
      tokens, each chunk attending to the cache the policy left (a single forward would
      never see its own compression).
    """

    score_chunk = 32

    name = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        kv_policy: KVPolicy | None = None,
        kv_dtype: str | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.kv_policy = kv_policy
        #: the deploy dtype full-precision keys and values are counted in (default: the model's)
        self.kv_dtype = kv_dtype or str(model.dtype).removeprefix("torch.")
        self.expert_skip: Any = None  # an attached ExpertSkip (methods/experts/skip.py)
        self._kv_bytes: float | None = None

    def _cache(self) -> dict[str, Any]:
        if self.kv_policy is None:
            return {}
        return {"past_key_values": self.kv_policy.make_cache(self.model), "use_cache": True}

    @property
    def max_positions(self) -> int:
        """``max_position_embeddings`` of the (text) config, else the tokenizer's limit."""
        config = self.model.config.get_text_config(decoder=True)
        value = getattr(config, "max_position_embeddings", None)
        if value is None:
            value = getattr(self.tokenizer, "model_max_length", None)
        if not isinstance(value, int) or value <= 0 or value > _MAX_SANE_POSITIONS:
            raise ValueError("the model's config has no max_position_embeddings")
        return value

    def parameter_count(self) -> int:
        from knowpress.formats.sizes import parameter_count

        return parameter_count(self.model)

    @torch.inference_mode()
    def kv_bytes_per_token(self) -> float:
        """Bytes the cache holds after a prefill of ``KV_PROBE_TOKENS`` tokens, per token:
        measured on the cache the attached policy (or the default full cache) builds, its
        full-precision keys and values counted in ``kv_dtype`` (the deploy dtype, whatever
        the compute dtype: a cache computed in float32 on a CPU deploys in bfloat16)."""
        if self._kv_bytes is None:
            from knowpress.methods.kv.full import FullCache

            policy = self.kv_policy or FullCache(name="full")
            n = min(KV_PROBE_TOKENS, self.max_positions)
            vocab = self.model.config.get_text_config(decoder=True).vocab_size
            ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
            cache = policy.make_cache(self.model)
            self.model(input_ids=ids.to(_device(self.model)), past_key_values=cache, use_cache=True)
            self._kv_bytes = policy.cache_bytes(cache, dtype_bytes(self.kv_dtype)) / n
        return self._kv_bytes

    def describe(self) -> dict[str, Any]:
        offloaded = placement(self.model)
        return {
            "runtime": self.name,
            "device": str(_device(self.model)),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "kv_policy": None if self.kv_policy is None else self.kv_policy.name,
            "kv_dtype": self.kv_dtype,
            **({} if self.expert_skip is None else
               {"expert_skip": f"{self.expert_skip.name} beta={self.expert_skip.beta:g}"}),
            **({} if offloaded is None else {"offload": offloaded}),
        }  # fmt: skip

    def _batches(
        self, texts: Sequence[str], side: str, truncate: bool = False
    ) -> Iterator[BatchEncoding]:
        """Tokenized batches padded on ``side`` (left for generation, right for scoring);
        ``truncate`` cuts texts to ``max_positions`` tokens (scoring only)."""
        tok = self.tokenizer
        previous, tok.padding_side = tok.padding_side, side
        self.model.eval()
        limit = {"truncation": True, "max_length": self.max_positions} if truncate else {}
        try:
            for start in range(0, len(texts), self.batch_size):
                yield tok(
                    list(texts[start : start + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=True,
                    **limit,
                ).to(_device(self.model))
        finally:
            tok.padding_side = previous

    def _padded(self, sequences: Sequence[Sequence[int]], side: str,
                allow_empty: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Token-id lists as ``(input_ids, attention_mask)``, padded on ``side``."""
        width = max(len(s) for s in sequences)
        if width == 0 and not allow_empty:
            raise ValueError("no tokens to run")
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, span] = 1
        device = _device(self.model)
        return ids.to(device), mask.to(device)

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int,
               contexts: Sequence[str | None] | None = None) -> list[str]:  # fmt: skip
        """Greedy answers, decoded without special tokens and cut at end-of-sequence."""
        tok, out = self.tokenizer, []
        self.model.eval()
        if self.kv_policy is not None and contexts is not None and any(contexts):
            size = self.batch_size
            batches: Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = (
                self._prefilled(list(prompts[i : i + size]), contexts[i : i + size])
                for i in range(0, len(prompts), size))  # fmt: skip
        else:  # decoder-only: pad on the left
            batches = ((b["input_ids"], b["attention_mask"], self._cache())
                       for b in self._batches(prompts, "left"))  # fmt: skip
        for ids, mask, extra in batches:
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **({"use_cache": True} | extra),
            )  # fmt: skip
            out.extend(tok.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True))
        return [text.strip() for text in out]

    def _prefilled(self, prompts: list[str], contexts: Sequence[str | None]
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
        """``[pad, context | pad, question]`` ids and mask (``split_contexts``), and a policy
        cache already holding each row's context."""
        parts = split_contexts(self.tokenizer, prompts, contexts)
        ctx_ids, ctx_mask = self._padded([c for c, _ in parts], "left", allow_empty=True)
        q_ids, q_mask = self._padded([q for _, q in parts], "left")
        cache = self._cache()
        if ctx_ids.shape[1]:
            positions = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
            self.model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=positions, **cache)
        return torch.cat([ctx_ids, q_ids], 1), torch.cat([ctx_mask, q_mask], 1), cache

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` of right-padded ``ids``: one forward, or chunk by chunk
        through the policy's cache."""
        if self.kv_policy is None:
            return self.model(input_ids=ids, attention_mask=mask).logits
        cache, parts = self._cache(), []
        for start in range(0, ids.shape[1], self.score_chunk):
            end = start + self.score_chunk
            parts.append(self.model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                                    **cache).logits)  # fmt: skip
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    def score_probe(self, rows: int, length: int) -> None:
        """One scoring pass (as ``next_token_logprobs`` runs it, its float32 log-softmax
        included) over ``rows`` seeded random sequences of ``length`` tokens, discarded: what
        ``runtimes/batching.py`` tries to learn whether a batch fits."""
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
        ids = ids.to(_device(self.model))
        logits = self._logits(ids, torch.ones_like(ids))
        torch.log_softmax(logits[:, :-1].float(), dim=-1)

    @torch.inference_mode()
    def nll(self, texts: Sequence[str], exclude_token_ids: Sequence[int] = ()) -> list[NLL]:
        """Summed next-token NLL per text (the first token is context, not scored; nor are
        targets in ``exclude_token_ids``); texts are cut to ``max_positions`` tokens."""
        out = []
        for batch in self._batches(texts, "right", truncate=True):
            logits = self._logits(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            for token in exclude_token_ids:
                mask &= targets != token
            logp = torch.log_softmax(logits, dim=-1)
            token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_nll = token_nll.masked_fill(~mask, 0.0)
            for row, row_mask in zip(token_nll, mask, strict=True):
                out.append(NLL(float(row.sum()), int(row_mask.sum())))
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            ids, mask = self._padded(chunk, "right")
            logits = self._logits(ids, mask)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            out.extend(logp[row, : len(seq) - 1] for row, seq in enumerate(chunk))
        return out

    @torch.inference_mode()
    def sample(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int
    ) -> list[list[int]]:
        out: list[list[int]] = []
        devices = [_device(self.model)] if _device(self.model).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left alone
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                ids, mask = self._padded(chunk, "left")
                generated = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                    top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                    **self._cache(),
                )  # fmt: skip
                new = generated[:, ids.shape[1] :].cpu().tolist()
                out.extend([*map(int, p), *n] for p, n in zip(chunk, new, strict=True))
        return out


def perplexity(nlls: Sequence[NLL]) -> float:
    """exp(total nats / total tokens) over a corpus."""
    tokens = sum(n.tokens for n in nlls)
    if tokens == 0:
        raise ValueError("perplexity of an empty corpus")
    return math.exp(sum(n.nats for n in nlls) / tokens)
