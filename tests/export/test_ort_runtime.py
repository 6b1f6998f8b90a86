"""OrtRuntime: the Runtime protocol on the exported graph, answering as TorchRuntime does
(greedy, nll, next-token log-probs, sampling, KV bytes), with the streaming policy applied
in the onnxruntime loop and other policies refused."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.compress.kv.streaming import StreamingPolicy
from knowpress.errors import KnowpressError
from knowpress.evaluate.loader import load_runtime
from knowpress.evaluate.runtime import KV_PROBE_TOKENS, TorchRuntime
from knowpress.export.session import left_padded
from knowpress.testing.export import export_folder
from knowpress.testing.models import tiny_llama, tiny_tokenizer

PROMPTS = ["w1 w2 w3", "w7 w9", "w4 w5 w6 w7 w8 w9 w10 w11 w12", "w30"]
STREAMING = StreamingPolicy(name="streaming", sinks=1, budget=4)


def _folder(root: Path, name: str, policy: Any = None) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        export_folder(tiny_llama(), tiny_tokenizer(), root / name, policy=policy)
    return root / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort")
    return {"full": _folder(root, "full"), "streaming": _folder(root, "streaming", STREAMING)}


def _torch(policy: Any = None) -> TorchRuntime:
    return TorchRuntime(tiny_llama(), tiny_tokenizer(), batch_size=3, kv_policy=policy)


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
    assert ort.kv_bytes_per_token() == ref.kv_bytes_per_token()
    assert ort.describe()["kv_policy"] is None and ort.describe()["device"] == "cpu"


def test_sampling_is_reproducible_and_full_length(folders: dict[str, Path]) -> None:
    ort = load_runtime(folders["full"])
    prompts = [[1, 5, 6], [1, 9]]
    first = ort.sample(prompts, max_new_tokens=7, seed=3)
    assert first == ort.sample(prompts, max_new_tokens=7, seed=3)
    assert first != ort.sample(prompts, max_new_tokens=7, seed=4)
    assert [len(s) for s in first] == [3 + 7, 2 + 7]
    assert all(p == s[: len(p)] for p, s in zip(prompts, first, strict=True))
    assert all(2 not in s[len(p) :] for p, s in zip(prompts, first, strict=True))  # no eos


def test_streaming_in_the_loop_matches_the_torch_policy(folders: dict[str, Path]) -> None:
    ort, ref = load_runtime(folders["streaming"], batch_size=3), _torch(STREAMING)
    assert ort.describe()["kv_policy"] == "streaming"
    got = ort.greedy(PROMPTS, max_new_tokens=8)
    assert got == ref.greedy(PROMPTS, max_new_tokens=8)
    full = load_runtime(folders["full"])
    prompts = [[1, *range(4, 14)], [1, 9, 8]]
    assert ort.sample(prompts, 12, seed=0) != full.sample(prompts, 12, seed=0)  # it evicts
    state = ort.decoder.empty(2)
    ids, valid = left_padded(prompts, 0)
    _, state = ort.decoder.forward(ids, valid, state)
    # row 0 keeps its first real token and its last 3; row 1 (3 real tokens) keeps all,
    # left-padded to 4; positions run on from the tokens seen
    assert state.mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert state.seen.tolist() == [11, 3] and state.past[0].shape[2] == 4
    # after the probe's prefill the loop holds sinks + window = budget tokens
    n = min(KV_PROBE_TOKENS, ort.max_positions)
    assert ort.kv_bytes_per_token() == ref.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4 * 4 / n


def test_policies_the_loop_cannot_run_are_refused(folders: dict[str, Path]) -> None:
    from knowpress.compress.kv import policy_from_json
    from knowpress.export.ort import OrtRuntime, read_record

    policy = policy_from_json({"name": "h2o", "budget": 4}, "test")
    with pytest.raises(KnowpressError, match=r"kv_policy 'h2o' cannot run in the onnxruntime "
                       r"loop \(it applies full, streaming\)"):  # fmt: skip
        OrtRuntime(folders["full"], tiny_tokenizer(), read_record(folders["full"]), policy)


def test_asking_for_cuda_without_its_provider_is_one_line(folders: dict[str, Path]) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDA runs")
    with pytest.raises(KnowpressError, match="onnxruntime has no CUDAExecutionProvider here"):
        load_runtime(folders["full"], device="cuda")
