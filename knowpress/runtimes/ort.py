"""``OrtRuntime``: the ``Runtime`` protocol on an exported ONNX graph, so every task scores
the deployed file itself (registered for the manifest format ``onnx`` by
``runtimes/loader.py``).

The same protocol as ``TorchRuntime``, on ``session.OnnxDecoder``'s KV-cache loop, where the
attached KV policy acts through its own cache layers: generation prefills once, then one
token per step, batched and left-padded; ``greedy`` with ``contexts`` prefills each context
under the policy first and reads the question after it (``runtime.split_contexts``);
``nll`` and ``next_token_logprobs`` read right-padded rows in one forward without a policy,
or in chunks of ``score_chunk`` tokens through the policy's cache with one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.onnx.format import EXPORT_FILE
from knowpress.runtimes.ort_session import OnnxDecoder, State, left_padded, right_padded
from knowpress.runtimes.torch import (
    KV_PROBE_TOKENS,
    NLL,
    TorchRuntime,
    dtype_bytes,
    split_contexts,
)

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(bfloat16)": "bfloat16"}  # fmt: skip


class OrtRuntime:
    name = "onnxruntime"
    score_chunk = TorchRuntime.score_chunk

    def __init__(
        self,
        folder: Path,
        tokenizer: Any,
        record: dict[str, Any],
        policy: Any = None,
        batch_size: int = 64,
        providers: list[str] | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise KnowpressError(f"{folder}: the tokenizer has no pad token; set one and re-export")
        self.folder, self.tokenizer, self.record = Path(folder), tokenizer, record
        self.spec = record["graph"]
        self.kv_policy, self.batch_size = policy, batch_size
        graph = self.folder / record["files"]["graph"]
        self.decoder = OnnxDecoder(graph, self.spec, policy, providers)
        eos = self.spec["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        past = {i.name: i.type for i in self.decoder.session.get_inputs()}
        #: the graph's past dtype: what the deployed loop holds keys and values in
        self.kv_dtype = ORT_DTYPES.get(past.get("past_key_values.0.key", ""), "float32")
        self._kv_bytes: float | None = None

    @property
    def max_positions(self) -> int:
        return int(self.spec["max_positions"])

    def parameter_count(self) -> int:
        return int(self.spec["parameter_count"])

    def kv_bytes_per_token(self) -> float:
        """Bytes of the past the loop holds after a ``KV_PROBE_TOKENS`` prefill, per token
        (the same probe as ``TorchRuntime``: seeded random ids, the policy applied; keys and
        values in the graph's past dtype)."""
        if self._kv_bytes is None:
            n = min(KV_PROBE_TOKENS, self.max_positions)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, self.spec["vocab_size"], (1, n), generator=gen).numpy()
            _, state = self.decoder.forward(ids, np.ones_like(ids), self.decoder.empty(1))
            held = self.decoder.cache_bytes(state, dtype_bytes(self.kv_dtype))
            self._kv_bytes = held / n
        return self._kv_bytes

    def describe(self) -> dict[str, Any]:
        providers = self.decoder.session.get_providers()
        return {
            "runtime": self.name,
            "device": "cuda" if "CUDAExecutionProvider" in providers else "cpu",
            "dtype": "float32",
            "kv_policy": None if self.kv_policy is None else self.kv_policy.name,
            "kv_dtype": self.kv_dtype,
            "weights": self.record.get("weights", "float32"),
        }

    def _chunks(self, items: Sequence[Any]) -> Any:
        for start in range(0, len(items), self.batch_size):
            yield list(items[start : start + self.batch_size])

    def _prefill(self, prompts: list[list[int]],
                 contexts: list[list[int]] | None) -> tuple[np.ndarray, State]:  # fmt: skip
        """Logits after each row's prompt: ``contexts`` (when given) prefilled first under
        the policy, the prompts (then the questions) after them, all left-padded."""
        pad = self.tokenizer.pad_token_id
        state = self.decoder.empty(len(prompts))
        if contexts is not None and max(map(len, contexts)):
            ids, valid = left_padded(contexts, pad)
            _, state = self.decoder.forward(ids, valid, state)
        ids, valid = left_padded(prompts, pad)
        return self.decoder.forward(ids, valid, state)

    def _generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        pick: Callable[..., Any],
        stop: bool,
        contexts: list[list[int]] | None = None,
    ) -> list[list[int]]:
        """New tokens per prompt: ``pick(last_logits [B, V]) -> [B]``; with ``stop`` a row ends
        at its end-of-sequence token (kept out of the result; the row is fed pads after it,
        as ``generate`` does)."""
        logits, state = self._prefill(prompts, contexts)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        for step in range(max_new_tokens):
            token = np.asarray(pick(logits[:, -1]), np.int64)
            for row, t in enumerate(token):
                if done[row]:
                    continue
                if stop and int(t) in self.eos:
                    done[row] = True
                else:
                    out[row].append(int(t))
            if done.all() or step == max_new_tokens - 1:
                break
            token = np.where(done, self.tokenizer.pad_token_id, token)[:, None]
            logits, state = self.decoder.forward(token, np.ones_like(token), state)
        return out

    def greedy_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   contexts: Sequence[Sequence[int]] | None = None) -> list[list[int]]:  # fmt: skip
        """Greedy new ids per prompt; with ``contexts`` each prompt is the question that
        follows its context (prefilled first)."""
        rows = [list(map(int, p)) for p in prompts]
        heads = None if contexts is None else [list(map(int, c)) for c in contexts]
        out = []
        for start in range(0, len(rows), self.batch_size):
            span = slice(start, start + self.batch_size)
            out += self._generate(rows[span], max_new_tokens, lambda x: x.argmax(-1), stop=True,
                                  contexts=None if heads is None else heads[span])  # fmt: skip
        return out

    def greedy(self, prompts: Sequence[str], max_new_tokens: int,
               contexts: Sequence[str | None] | None = None) -> list[str]:  # fmt: skip
        """Greedy answers; with a KV policy and ``contexts``, each context is prefilled (and
        compressed) before its question is read, as ``TorchRuntime.greedy`` does."""
        if self.kv_policy is not None and contexts is not None and any(contexts):
            parts = split_contexts(self.tokenizer, prompts, contexts)
            new = self.greedy_ids([q for _, q in parts], max_new_tokens, [c for c, _ in parts])
        else:
            encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
            new = self.greedy_ids(encoded, max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def sample(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int
    ) -> list[list[int]]:
        """Temperature-1 samples with end-of-sequence suppressed (``torch.multinomial`` on a
        generator seeded with ``seed``: reproducible, the caller's RNG left alone)."""
        gen = torch.Generator().manual_seed(seed)
        eos = sorted(self.eos)

        def pick(logits: np.ndarray) -> np.ndarray:
            scores = torch.from_numpy(np.array(logits, np.float32))
            scores[:, eos] = -float("inf")
            return torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0].numpy()

        out = []
        for chunk in self._chunks([list(map(int, p)) for p in prompts]):
            new = self._generate(chunk, max_new_tokens, pick, stop=False)
            out += [p + n for p, n in zip(chunk, new, strict=True)]
        return out

    def _logits(self, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Logits ``[B, L, V]`` of right-padded rows: one forward, or chunk by chunk through
        the policy's cache (each chunk attends to what the policy kept)."""
        state = self.decoder.empty(len(ids))
        if self.kv_policy is None:
            return self.decoder.forward(ids, valid, state)[0]
        parts = []
        for start in range(0, ids.shape[1], self.score_chunk):
            end = start + self.score_chunk
            logits, state = self.decoder.forward(ids[:, start:end], valid[:, start:end], state)
            parts.append(logits)
        return np.concatenate(parts, axis=1)

    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        ids, valid = right_padded(rows, self.tokenizer.pad_token_id)
        logits = self._logits(ids, valid)
        logp = torch.log_softmax(torch.from_numpy(logits[:, :-1]).float(), dim=-1)
        return [logp[row, : len(seq) - 1] for row, seq in enumerate(rows)]

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for chunk in self._chunks([list(map(int, s)) for s in sequences]):
            out += self._logprobs(chunk)
        return out

    def nll(self, texts: Sequence[str], exclude_token_ids: Sequence[int] = ()) -> list[NLL]:
        """Summed next-token NLL per text, as ``TorchRuntime.nll`` (first token unscored,
        ``exclude_token_ids`` targets skipped, texts cut to ``max_positions`` tokens)."""
        limit = self.max_positions
        rows = [self.tokenizer(t, add_special_tokens=True)["input_ids"][:limit] for t in texts]
        out = []
        for seq, logp in zip(rows, self.next_token_logprobs(rows), strict=True):
            targets = torch.tensor(seq[1:], dtype=torch.long)
            keep = torch.ones_like(targets, dtype=torch.bool)
            for token in exclude_token_ids:
                keep &= targets != token
            nats = -logp.gather(-1, targets[:, None])[:, 0]
            out.append(NLL(float(nats[keep].sum()), int(keep.sum())))
        return out


def read_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / EXPORT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KnowpressError(
            f"{path}: unreadable export record ({exc}); re-run the export"
        ) from None
    graph = record.get("graph") if isinstance(record, dict) else None
    needed = ("layers", "kv_heads", "key_dims", "value_dims", "vocab_size", "max_positions")
    if (
        not isinstance(graph, dict)
        or any(k not in graph for k in needed)
        or not isinstance(record.get("files"), dict)
        or "graph" not in record["files"]
    ):
        raise KnowpressError(f"{path}: not a knowpress export record; re-run the export")
    return record


def load_onnx(location: str, manifest: Any, options: Any) -> OrtRuntime:
    """The ``onnxruntime`` runtime of an ``onnx`` artifact (``RUNTIMES``): the graph, its
    tokenizer, the policy."""
    from transformers import AutoTokenizer

    from knowpress.runtimes.loader import expert_skip_of, kv_policy_of

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise KnowpressError(
            f"{location}: scoring an ONNX artifact needs onnxruntime: "
            "pip install 'knowpress[export]' (or '[gpu]' for onnxruntime-gpu)"
        ) from None
    where = str(Path(location) / "knowpress_artifact.json")
    policy = kv_policy_of(manifest, where)
    if expert_skip_of(manifest, where) is not None:
        raise KnowpressError(f"{where}: expert_skip cannot run in the onnxruntime loop")
    providers = ["CUDAExecutionProvider"] if str(options.device).startswith("cuda") else None
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:  # as load_model does
        tokenizer.pad_token = tokenizer.eos_token
    return OrtRuntime(
        Path(location),
        tokenizer,
        read_record(Path(location)),
        policy,
        batch_size=options.batch_size,
        providers=providers,
    )
