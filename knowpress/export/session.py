"""The onnxruntime KV-cache loop over an exported graph (``onnx.py``'s signature).

``OnnxDecoder.forward(ids, mask, positions, past)`` runs one graph call; ``prefill`` starts
from an empty past (``past_sequence = 0``), ``step`` appends one token per row. Rows are
left-padded: ``mask`` covers past + current tokens, positions are each row's count of real
tokens seen so far (``cumsum(mask) - 1``), so pads shift nothing.

Streaming (StreamingLLM, arXiv:2309.17453) as ``compress/kv/streaming.py`` does it: after
every forward (prefill and each decoding step) each row keeps its first ``sinks`` real
tokens and its last ``budget − sinks`` real tokens of the past; rows that keep fewer are left-padded
(mask 0) to the longest, and positions run on from the tokens seen, not from the cache
length (keys keep the rotary positions they were written with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knowpress.errors import KnowpressError

SUPPORTED_POLICIES = ("full", "streaming")


@dataclass
class State:
    """The past of a batch: ``past`` per layer (key, value) ``[B, H, S, D]``, ``mask [B, S]``
    over it, ``seen [B]`` real tokens each row has consumed (its next position)."""

    past: list[np.ndarray]
    mask: np.ndarray
    seen: np.ndarray


def check_policy(policy: Any, where: str) -> None:
    if policy is not None and policy.name not in SUPPORTED_POLICIES:
        raise KnowpressError(
            f"{where}: kv_policy {policy.name!r} cannot run in the onnxruntime loop "
            f"(it applies {', '.join(SUPPORTED_POLICIES)}); export without that policy"
        )


class OnnxDecoder:
    def __init__(
        self,
        graph: Path,
        spec: dict[str, Any],
        policy: Any = None,
        providers: list[str] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        wanted = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(graph), options, providers=wanted)
        if self.session.get_providers()[0] != wanted[0]:  # onnxruntime falls back silently
            raise KnowpressError(
                f"onnxruntime has no {wanted[0]} here ({', '.join(ort.get_available_providers())}"
                "); for CUDA install knowpress[gpu] (onnxruntime-gpu) instead of [export]"
            )
        self.spec, self.policy = spec, policy
        self.layers = int(spec["layers"])
        self.names = [o.name for o in self.session.get_outputs()]

    def empty(self, batch: int) -> State:
        past = []
        for heads, kd, vd in zip(
            self.spec["kv_heads"], self.spec["key_dims"], self.spec["value_dims"], strict=True
        ):
            past += [
                np.zeros((batch, heads, 0, kd), np.float32),
                np.zeros((batch, heads, 0, vd), np.float32),
            ]
        return State(past, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))

    def forward(self, ids: np.ndarray, valid: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Logits ``[B, S, V]`` of ``ids [B, S]`` (``valid``: 1 real, 0 pad) after ``state``;
        the new state holds the present (evicted by the policy)."""
        valid = valid.astype(np.int64)
        positions = np.maximum(state.seen[:, None] + np.cumsum(valid, axis=1) - 1, 0)
        mask = np.concatenate([state.mask, valid], axis=1)
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": mask,
            "position_ids": positions.astype(np.int64),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = state.past[2 * i]
            feed[f"past_key_values.{i}.value"] = state.past[2 * i + 1]
        out = self.session.run(self.names, feed)
        new = State(list(out[1:]), mask, state.seen + valid.sum(axis=1))
        return out[0], self._evict(new)

    def _evict(self, state: State) -> State:
        """Streaming: keep each row's first ``sinks`` and last ``window`` real tokens, where
        ``sinks + window`` is the policy's capacity (its budget, or ``⌈budget · seen⌉`` with
        ``seen`` the positions the batch has seen, as ``compress/kv/evicting.py`` counts)."""
        if self.policy is None or self.policy.name != "streaming":
            return state
        sinks, budget = self.policy.sinks, self.policy.budget
        capacity = budget if isinstance(budget, int) else math.ceil(budget * int(state.seen.max()))
        window = max(capacity, sinks + 1) - sinks
        if state.mask.shape[1] <= sinks + window:
            return state
        keep = []
        for row in state.mask:
            real = np.flatnonzero(row)
            keep.append(
                real
                if len(real) <= sinks + window
                else np.concatenate([real[:sinks], real[len(real) - window :]])
            )
        width = max(len(k) for k in keep)
        index = np.zeros((len(keep), width), np.int64)
        mask = np.zeros((len(keep), width), np.int64)
        for row, kept in enumerate(keep):
            index[row, width - len(kept) :], mask[row, width - len(kept) :] = kept, 1
        past = [np.take_along_axis(t, index[:, None, :, None], axis=2) for t in state.past]
        return State(past, mask, state.seen)

    def cache_bytes(self, state: State) -> int:
        return sum(t.nbytes for t in state.past)


def left_padded(sequences: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad, np.int64)
    valid = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :], valid[row, width - len(seq) :] = seq, 1
    return ids, valid


def right_padded(sequences: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad, np.int64)
    valid = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], valid[row, : len(seq)] = seq, 1
    return ids, valid


def graph_inputs(graph: Path) -> list[tuple[str, list[int | str]]]:
    """(name, dims) of the graph's inputs, symbolic axes by name (read without weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return [
        (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in model.graph.input
    ]
