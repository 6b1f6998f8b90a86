"""The onnxruntime KV-cache loop over an exported graph (``onnx.py``'s signature), with the
attached KV policy acting in it through the policy's own cache layers (``compress/kv``).

``OnnxDecoder.forward(ids, valid, state)`` runs one graph call: ``state.cache`` holds one
cache layer per decoder layer, built by the policy exactly as ``TorchRuntime`` builds them
(``KVPolicy.layers``; ``full`` without a policy). Before the call each layer's ``past()``
(what the next forward attends to: kept keys and values ``[B, H, S, D]`` and which slots
hold a real token) is fed as ``past_key_values.{i}``; after it the new tokens' keys and
values (the last ``q`` positions of ``present.{i}``) go to the layer's ``update`` — the
same call a torch attention module makes — which evicts or quantizes by the policy's rule.
So each rule is written once and both runtimes run it.

Masks: ``state.history [B, columns]`` is every column fed so far (1 real, 0 pad), the 2-D
mask a torch model would be given, and the layers read it as their ``valid``. A graph with
``past_valid.{i}`` inputs (``head_budget``: heads keep different counts) takes each layer's
per-head slot mask; otherwise every head and layer must agree on which slots are real (they
do: eviction keeps the same number per head, pads first, in position order) and that row
mask is the past part of ``attention_mask``. Policies that score tokens by attention read
the graph's ``queries.{i}`` outputs (post-rotary, ``[B, H_q, q, D]``) through
``GraphCache.queries``. Positions are each row's count of real tokens seen (``seen``), so
pads and evictions shift nothing (kept keys keep the rotary positions they were written
with); pads sit at position 0, as ``generate`` puts them (a quantized cache stores pad keys
beside real ones in a block, so both runtimes must write the same ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError, error_summary
from knowpress.formats.onnx.policy_io import PAST_VALID, QUERIES
from knowpress.methods.kv.base import CacheShape, Probe
from knowpress.methods.kv.evicting import PolicyCache


class GraphCache(PolicyCache):
    """A policy's layers driven by the loop: ``valid`` is the history mask, ``graph_queries``
    the current forward's ``queries.{i}`` outputs."""

    def __init__(self, layers: list[Any], scaling: list[float]) -> None:
        super().__init__(layers)
        self.scaling = scaling
        self.graph_queries: dict[int, torch.Tensor] = {}

    def queries(self, index: int, kv_heads: int) -> tuple[torch.Tensor, float]:
        states = self.graph_queries[index]  # [B, H_q, q, D]
        b, heads, q, d = states.shape
        return states.view(b, kv_heads, heads // kv_heads, q, d).float(), self.scaling[index]


@dataclass
class State:
    """The past of a batch: its ``cache`` (a layer per decoder layer), ``history [B,
    columns]`` over every column fed so far, ``seen [B]`` real tokens per row (its next
    position)."""

    cache: GraphCache
    history: np.ndarray
    seen: np.ndarray


def check_policy(policy: Any, io: list[str] | frozenset[str], where: str) -> None:
    """One line when the graph lacks the I/O ``policy`` needs (an export made without it)."""
    if policy is None:
        return
    missing = sorted(policy.graph_io() - set(io))
    if missing:
        raise KnowpressError(
            f"{where}: kv_policy {policy.name!r} needs the graph's {' and '.join(missing)} I/O, "
            "which this export lacks; re-export with the policy attached (compress_kv before "
            "export) so the graph carries it"
        )


def graph_shape(spec: dict[str, Any]) -> CacheShape:
    eos = spec.get("eos_token_id")
    special = {spec.get("bos_token_id"), spec.get("pad_token_id")}
    special |= set(eos) if isinstance(eos, list) else {eos}
    return CacheShape(int(spec["layers"]), int(spec["key_dims"][0]), int(spec["vocab_size"]),
                      frozenset(s for s in special if isinstance(s, int)),
                      int(spec["max_positions"]), str(spec["model_type"]))  # fmt: skip


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
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=wanted)
        except Exception as exc:  # onnxruntime's own exception types (protobuf, external data)
            raise KnowpressError(
                f"{graph}: onnxruntime cannot load this graph ({error_summary(exc, 160)}); the "
                "graph or its external data file is damaged or incomplete: re-export it"
            ) from None
        if self.session.get_providers()[0] != wanted[0]:  # onnxruntime falls back silently
            raise KnowpressError(
                f"onnxruntime has no {wanted[0]} here ({', '.join(ort.get_available_providers())}"
                "); for CUDA install knowpress[gpu] (onnxruntime-gpu) instead of [export]"
            )
        self.spec, self.policy = spec, policy
        self.io = frozenset(spec.get("io", []))
        check_policy(policy, self.io, str(graph))
        self.layers = int(spec["layers"])
        self.shape = graph_shape(spec)
        self.names = [o.name for o in self.session.get_outputs()]
        self.probe = Probe(self._probe)  # head_budget's copy probes, measured once

    def empty(self, batch: int) -> State:
        """A fresh past for ``batch`` rows: the policy's layers (plain ones without one)."""
        from knowpress.methods.kv.full import FullCache

        policy = self.policy or FullCache(name="full")
        layers = policy.layers(self.shape, self.probe)
        scaling = self.spec.get("scaling") or [1.0] * self.layers
        cache = GraphCache(layers, scaling)
        return State(cache, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))

    def forward(self, ids: np.ndarray, valid: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Logits ``[B, S, V]`` of ``ids [B, S]`` (``valid``: 1 real, 0 pad) after ``state``;
        the new state holds what the policy's layers kept."""
        valid = valid.astype(np.int64)
        q = ids.shape[1]
        cache = state.cache
        cache.valid = torch.from_numpy(state.history.astype(bool))
        feed, past_mask = self._past(cache, state.history)
        # a real token's position is the real tokens before it; a pad's is 0, as generate does
        positions = np.where(valid > 0, state.seen[:, None] + np.cumsum(valid, axis=1) - 1, 0)
        feed |= {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.concatenate([past_mask, valid], axis=1),
            "position_ids": positions.astype(np.int64),
        }
        out = dict(zip(self.names, self.session.run(self.names, feed), strict=True))
        history = np.concatenate([state.history, valid], axis=1)
        cache.valid = torch.from_numpy(history.astype(bool))
        if QUERIES in self.io:
            cache.graph_queries = {
                i: torch.from_numpy(out[f"queries.{i}"]) for i in range(self.layers)
            }
        for i, layer in enumerate(cache.layers):
            keys = torch.from_numpy(np.ascontiguousarray(out[f"present.{i}.key"][:, :, -q:]))
            values = torch.from_numpy(np.ascontiguousarray(out[f"present.{i}.value"][:, :, -q:]))
            layer.update(keys, values)
        cache.graph_queries = {}
        return out["logits"], State(cache, history, state.seen + valid.sum(axis=1))

    def _past(self, cache: GraphCache, history: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """The ``past_key_values`` (and ``past_valid``) feed from the layers' ``past()``,
        every layer padded to the longest with dead slots in front, and the past's row mask."""
        b = history.shape[0]
        views = []
        for i, layer in enumerate(cache.layers):
            view = layer.past() if hasattr(layer, "past") else _plain(layer)
            if view is None:
                heads = self.spec["kv_heads"][i]
                view = (torch.zeros(b, heads, 0, self.spec["key_dims"][i]),
                        torch.zeros(b, heads, 0, self.spec["value_dims"][i]), None)  # fmt: skip
            keys, values, live = view
            if live is None:  # every column seen, in order
                live = torch.from_numpy(history.astype(bool))[:, None].expand(
                    b, keys.shape[1], keys.shape[2]
                )
            views.append((keys, values, live))
        width = max(v[0].shape[2] for v in views)
        feed, masks = {}, []
        for i, (keys, values, live) in enumerate(views):
            front = width - keys.shape[2]
            feed[f"past_key_values.{i}.key"] = _front(keys, front).float().numpy()
            feed[f"past_key_values.{i}.value"] = _front(values, front).float().numpy()
            live = _front(live[..., None], front)[..., 0]
            masks.append(live)
            if PAST_VALID in self.io:
                feed[f"past_valid.{i}"] = live.numpy()
        if PAST_VALID in self.io:
            return feed, np.ones((b, width), np.int64)
        rows = masks[0][:, 0]
        if any(not torch.equal(m, rows[:, None].expand_as(m)) for m in masks):
            raise KnowpressError(
                "the KV policy keeps different tokens real per head; its graph needs "
                "past_valid inputs: re-export with the policy attached"
            )
        return feed, rows.long().numpy()

    def _probe(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """One prefill of ``ids`` from an empty past: per layer the post-rotary queries
        ``[P, H_kv, G, S, D]``, keys and scaling (``head_importance.Probe``)."""
        if QUERIES not in self.io:
            raise KnowpressError("head_budget probes need the graph's queries outputs; re-export")
        batch = ids.numpy().astype(np.int64)
        feed: dict[str, Any] = {}
        for i in range(self.layers):
            heads = self.spec["kv_heads"][i]
            for part, dim in (("key", "key_dims"), ("value", "value_dims")):
                feed[f"past_key_values.{i}.{part}"] = np.zeros(
                    (len(batch), heads, 0, self.spec[dim][i]), np.float32
                )
            if PAST_VALID in self.io:
                feed[f"past_valid.{i}"] = np.zeros((len(batch), heads, 0), bool)
        positions = np.broadcast_to(np.arange(batch.shape[1]), batch.shape)
        feed |= {"input_ids": batch, "attention_mask": np.ones_like(batch),
                 "position_ids": np.ascontiguousarray(positions)}  # fmt: skip
        out = dict(zip(self.names, self.session.run(self.names, feed), strict=True))
        result = []
        for i in range(self.layers):
            keys = torch.from_numpy(out[f"present.{i}.key"])
            states = torch.from_numpy(out[f"queries.{i}"])
            p, heads, s, d = states.shape
            grouped = states.view(p, keys.shape[1], heads // keys.shape[1], s, d)
            result.append((grouped, keys, self.spec["scaling"][i]))
        return result

    def cache_bytes(self, state: State, float_bytes: int | None = None) -> int:
        from knowpress.methods.kv.full import FullCache

        policy = self.policy or FullCache(name="full")
        return policy.cache_bytes(state.cache, float_bytes)


def _plain(layer: Any) -> tuple[torch.Tensor, torch.Tensor, None] | None:
    """A transformers ``DynamicLayer``'s past (all columns, in order)."""
    if not layer.is_initialized or layer.keys.dim() != 4:
        return None
    return layer.keys, layer.values, None


def _front(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [B, H, S, ...]`` with ``n`` zero slots in front along dim 2."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2)


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
