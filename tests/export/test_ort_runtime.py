"""OrtRuntime: the Runtime protocol on the exported graph, answering as TorchRuntime does
(greedy, nll, next-token log-probs, sampling, KV bytes); every registered KV policy runs in
the onnxruntime loop through its own cache layers and agrees with the torch runtime."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import default_entries as rows
import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.manifest import MANIFEST_FILE
from knowpress.methods.kv import policy_from_json
from knowpress.methods.kv.streaming import StreamingPolicy
from knowpress.runtimes.loader import load_runtime
from knowpress.runtimes.ort_session import left_padded
from knowpress.runtimes.torch import KV_PROBE_TOKENS, TorchRuntime
from knowpress.testing.export import export_folder
from knowpress.testing.models import tiny_llama, tiny_tokenizer

PROMPTS = ["w1 w2 w3", "w7 w9", "w4 w5 w6 w7 w8 w9 w10 w11 w12", "w30"]
#: long enough that every policy's budget (4 tokens, or a KIVI group of 4) acts
LONG = [" ".join(f"w{(7 * i + k) % 90 + 3}" for i in range(n)) for k, n in ((1, 30), (2, 9),
                                                                          (3, 22))]  # fmt: skip
CONTEXTS = [LONG[0], None, LONG[2][: len(LONG[2]) // 2].rsplit(" ", 1)[0]]
SEQUENCES = [[1, *((5 * i) % 90 + 3 for i in range(70))], [1, 9, 8], [1, *range(4, 50)]]
#: KL(torch ‖ onnxruntime) per token through the same policy: float32 rounding only
KL_TOLERANCE = 1e-5


def sharp() -> Any:
    torch.manual_seed(1)  # larger weights: peaked attention, no near-ties between runtimes
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def _export(root: Path, name: str, policy: Any = None, model: Any = None) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        export_folder(model or tiny_llama(), tiny_tokenizer(), root / name, policy=policy)
    return root / name


def _attached(base: Path, target: Path, policy: Any) -> Path:
    """``base``'s bundle with ``policy`` attached in its manifest (the graph is the same for
    every policy with the same graph I/O)."""
    shutil.copytree(base, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["runtime"] = {"kv_policy": policy.model_dump(mode="json")}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort")
    return {"full": _export(root, "full"), "streaming": _export(root, "streaming", STREAMING)}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[frozenset[str], Path]:
    """One sharpened model exported once per graph I/O a policy can need."""
    root = tmp_path_factory.mktemp("policy-graphs")
    kinds: dict[frozenset[str], Any] = {}
    for block, _ in rows.KV_POLICIES.values():
        policy = policy_from_json(block, "test")
        kinds.setdefault(policy.graph_io(), policy)
    return {
        io: _export(root, "-".join(sorted(io)) or "plain", p, sharp()) for io, p in kinds.items()
    }


STREAMING = StreamingPolicy(name="streaming", sinks=1, budget=4)


def _torch(policy: Any = None, model: Any = None, **kw: Any) -> TorchRuntime:
    return TorchRuntime(model or tiny_llama(), tiny_tokenizer(), batch_size=3, kv_policy=policy,
                        **kw)  # fmt: skip


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Largest per-token KL(p ‖ q) of log-prob rows."""
    return float((p.exp() * (p - q)).sum(-1).max())


@pytest.mark.parametrize("name", sorted(rows.KV_POLICIES))
def test_every_policy_runs_in_the_loop_as_in_torch(name: str, graphs: dict, tmp_path: Path) -> None:
    policy = policy_from_json(rows.KV_POLICIES[name][0], "test")
    folder = _attached(graphs[policy.graph_io()], tmp_path / name, policy)
    ort = load_runtime(folder, batch_size=3)
    ref = _torch(policy, sharp(), kv_dtype="float32")
    assert ort.describe()["kv_policy"] == name
    assert ort.greedy(LONG, 6) == ref.greedy(LONG, 6)
    assert ort.greedy(LONG, 6, contexts=CONTEXTS) == ref.greedy(LONG, 6, contexts=CONTEXTS)
    got, want = ort.next_token_logprobs(SEQUENCES), ref.next_token_logprobs(SEQUENCES)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert max(_kl(w, g) for w, g in zip(want, got, strict=True)) < KL_TOLERANCE
    for a, b in zip(ort.nll(LONG), ref.nll(LONG), strict=True):
        assert a.tokens == b.tokens and a.nats == pytest.approx(b.nats, rel=1e-4)
    assert ort.kv_bytes_per_token() == ref.kv_bytes_per_token()  # float32 past, same rule
    if name != "full":  # the policy acts: scoring differs from the whole past
        whole = load_runtime(graphs[frozenset()], batch_size=3).next_token_logprobs(SEQUENCES)
        assert _kl(whole[0], got[0]) > 1e-3


def test_answers_equal_torch_runtime(folders: dict[str, Path]) -> None:
    ort, ref = load_runtime(folders["full"], batch_size=3), _torch()
    assert ort.name == "onnxruntime"
    assert ort.greedy(PROMPTS, max_new_tokens=6) == ref.greedy(PROMPTS, max_new_tokens=6)
    for a, b in zip(ort.nll(PROMPTS, [5]), ref.nll(PROMPTS, [5]), strict=True):
        assert a.tokens == b.tokens and a.nats == pytest.approx(b.nats, rel=1e-4)
    seqs = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 4, 4, 8]]
    for a, b in zip(ort.next_token_logprobs(seqs), ref.next_token_logprobs(seqs), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    assert ort.max_positions == ref.max_positions
    assert ort.parameter_count() == ref.parameter_count()
    assert ort.kv_bytes_per_token() == ref.kv_bytes_per_token()  # both hold float32
    assert ort.describe()["kv_policy"] is None and ort.describe()["device"] == "cpu"
    assert ort.describe()["kv_dtype"] == "float32"  # the graph's past: what it deploys


def test_sampling_is_reproducible_and_full_length(folders: dict[str, Path]) -> None:
    ort = load_runtime(folders["full"])
    prompts = [[1, 5, 6], [1, 9]]
    first = ort.sample(prompts, max_new_tokens=7, seed=3)
    assert first == ort.sample(prompts, max_new_tokens=7, seed=3)
    assert first != ort.sample(prompts, max_new_tokens=7, seed=4)
    assert [len(s) for s in first] == [3 + 7, 2 + 7]
    assert all(p == s[: len(p)] for p, s in zip(prompts, first, strict=True))
    assert all(2 not in s[len(p) :] for p, s in zip(prompts, first, strict=True))  # no eos


def test_streaming_keeps_sinks_and_window_per_row(folders: dict[str, Path]) -> None:
    ort, ref = load_runtime(folders["streaming"], batch_size=3), _torch(STREAMING)
    assert ort.greedy(PROMPTS, max_new_tokens=8) == ref.greedy(PROMPTS, max_new_tokens=8)
    full = load_runtime(folders["full"])
    prompts = [[1, *range(4, 14)], [1, 9, 8]]
    assert ort.sample(prompts, 12, seed=0) != full.sample(prompts, 12, seed=0)  # it evicts
    ids, valid = left_padded(prompts, 0)
    _, state = ort.decoder.forward(ids, valid, ort.decoder.empty(2))
    # each layer keeps 4 columns: row 0 its first real token and its last 3; row 1 (3 real
    # tokens) all of them and its earliest pad (masked); positions from tokens seen
    layer = state.cache.layers[0]
    assert layer.pos[0, 0].tolist() == [0, 8, 9, 10] and layer.pos[1, 0].tolist() == [0, 8, 9, 10]
    assert layer.past()[2][:, 0].tolist() == [[True] * 4, [False, True, True, True]]
    assert state.seen.tolist() == [11, 3]
    # after the probe's prefill the loop holds budget tokens per layer, in float32
    n = min(KV_PROBE_TOKENS, ort.max_positions)
    assert ort.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4 * 4 / n


def test_a_graph_without_the_io_a_policy_needs_is_refused(folders: dict[str, Path]) -> None:
    from knowpress.runtimes.ort import OrtRuntime, read_record

    policy = policy_from_json({"name": "h2o", "budget": 4}, "test")
    with pytest.raises(KnowpressError, match=r"kv_policy 'h2o' needs the graph's queries I/O, "
                       r"which this export lacks; re-export with the policy attached"):  # fmt: skip
        OrtRuntime(folders["full"], tiny_tokenizer(), read_record(folders["full"]), policy)


def test_the_bundle_readme_states_the_policy_once(folders: dict[str, Path], graphs: dict) -> None:
    plain = (folders["full"] / "README.md").read_text()
    assert plain.count("KV policy:") == 1 and "KV policy: none." in plain
    text = (folders["streaming"] / "README.md").read_text()
    assert text.count("KV policy:") == 1 and '"name": "streaming"' in text
    assert "does not apply the KV policy above" in text
    head = next(p for io, p in graphs.items() if "past_valid" in io)
    assert "`past_valid.{i} [batch, kv_heads, past]`" in (head / "README.md").read_text()


def test_damaged_graphs_are_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    for damage in ("empty", "truncated", "data"):
        folder = tmp_path / damage
        shutil.copytree(folders["full"], folder)
        if damage == "data":
            (folder / "model.onnx.data").write_bytes(b"")
        else:
            graph = folder / "model.onnx"
            graph.write_bytes(b"" if damage == "empty" else graph.read_bytes()[:200])
        with pytest.raises(KnowpressError, match=r"onnxruntime cannot load this graph .* "
                           r"damaged or incomplete: re-export it"):  # fmt: skip
            load_runtime(folder)
    (folder / "knowpress_export.json").write_text('{"graph": 3}')
    with pytest.raises(KnowpressError, match="not a knowpress export record"):
        load_runtime(folder)


def test_asking_for_cuda_without_its_provider_is_one_line(folders: dict[str, Path]) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDA runs")
    with pytest.raises(KnowpressError, match="onnxruntime has no CUDAExecutionProvider here"):
        load_runtime(folders["full"], device="cuda")


def test_the_graph_probe_equals_the_torch_probe(graphs: dict) -> None:
    """The ``queries.{i}`` outputs are what ``attention.queries`` recomputes on torch: the
    two runtimes' probes (head_budget's head scores) agree on queries, keys and scaling."""
    from knowpress.methods.kv.head_importance import torch_probe
    from knowpress.runtimes.ort_session import OnnxDecoder

    folder = next(p for io, p in graphs.items() if io == frozenset({"queries"}))
    record = json.loads((folder / "knowpress_export.json").read_text())
    decoder = OnnxDecoder(folder / "model.onnx", record["graph"])
    ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    graph, eager = decoder.probe.run(ids), torch_probe(sharp()).run(ids)
    assert len(graph) == len(eager) == 2
    for (q, k, s), (q2, k2, s2) in zip(graph, eager, strict=True):
        assert q.shape == q2.shape == (3, 2, 2, 20, 16) and s == pytest.approx(s2)
        assert torch.allclose(q, q2, atol=1e-4) and torch.allclose(k, k2, atol=1e-4)
