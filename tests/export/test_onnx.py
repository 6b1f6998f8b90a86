"""ONNX export with the KV cache as graph I/O: parity with PyTorch on tiny dense and MoE
decoders (prefill and decode at several past lengths), greedy tokens, clear refusals."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.onnx.graph import (
    KVDecoder,
    check_exportable,
    export_graph,
    graph_inputs,
    io_names,
)
from knowpress.pipeline import export_parity as parity
from knowpress.runtimes.ort_session import OnnxDecoder
from knowpress.testing.models import tiny_llama, tiny_moe

ARCHS = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _model(arch: str) -> Any:
    return tiny_llama() if arch == "llama" else tiny_moe(arch, layers=2)


@pytest.fixture(scope="module", params=ARCHS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = _model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        spec = export_graph(model, path)
    return request.param, model, OnnxDecoder(path, spec.dump()), path


def _inputs(spec: dict[str, Any], batch: int, seq: int, past: int, seed: int) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec["vocab_size"], (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, : min(2, past)] = 0  # row 0 left-padded inside the past
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = []
    for heads, kd, vd in zip(spec["kv_heads"], spec["key_dims"], spec["value_dims"], strict=True):
        kv += [torch.randn(batch, heads, past, kd, generator=gen),
               torch.randn(batch, heads, past, vd, generator=gen)]  # fmt: skip
    return ids, mask, pos, tuple(kv)


@pytest.mark.parametrize(("past", "seq"), [(0, 5), (0, 1), (1, 1), (6, 1), (6, 3)])
def test_graph_matches_pytorch_at_each_past_length(exported: Any, past: int, seq: int) -> None:
    arch, model, decoder, _ = exported
    ids, mask, pos, kv = _inputs(decoder.spec, 2, seq, past, seed=past * 10 + seq)
    with torch.no_grad():
        expected = KVDecoder(model, decoder.spec["layers"])(ids, mask, pos, kv)
    inputs, outputs = io_names(decoder.spec["layers"])
    feed = dict(zip(inputs, [t.numpy() for t in (ids, mask, pos, *kv)], strict=True))
    got = decoder.session.run(outputs, feed)
    assert got[1].shape[2] == past + seq  # present = past + new tokens
    for name, a, b in zip(outputs, got, expected, strict=True):
        assert np.abs(a - b.numpy()).max() < 1e-4, (arch, name)


def test_greedy_tokens_and_decode_logits_equal_pytorch(exported: Any) -> None:
    arch, model, decoder, _ = exported
    result = parity.measure(model, decoder, count=3, steps=6)
    assert result["greedy_equal"], arch
    assert result["max_rel_logits"] < 1e-5, (arch, result)


def test_axes_are_dynamic_and_named(exported: Any) -> None:
    _, _, _, path = exported
    dims = dict(graph_inputs(path))
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.0.key"][0::2] == ["batch", "past_sequence"]
    assert (path.parent / "model.onnx.data").stat().st_size > 0  # weights as external data


def test_unsupported_architecture_is_named_in_one_line() -> None:
    from transformers import GPT2Config

    with pytest.raises(KnowpressError, match=r"model_type 'gpt2': ONNX export supports llama,"):
        check_exportable(GPT2Config(n_layer=1, n_embd=32, n_head=2))


def test_parity_gate_fails_with_the_figures() -> None:
    bad = {"max_abs_logits": 0.5, "max_rel_logits": 0.1, "greedy_equal": True}
    with pytest.raises(KnowpressError, match=r"above parity\.max_rel_logits 0\.01"):
        parity.gate(bad, 0.01, greedy=True)
    with pytest.raises(KnowpressError, match="greedy tokens differ"):
        parity.gate(bad | {"max_rel_logits": 0.0, "greedy_equal": False,
                           "greedy_agreement": 0.9}, 0.01, greedy=True)  # fmt: skip
    parity.gate(bad | {"greedy_equal": False}, 0.2, greedy=False)


def test_refused_export_writes_no_graph(tmp_path: Path) -> None:
    """The architecture is checked before anything is written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from knowpress.testing.export import export_folder
    from knowpress.testing.models import tiny_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    with pytest.raises(KnowpressError, match="gpt2"):
        export_folder(model, tiny_tokenizer(), tmp_path / "x")
    assert not any((tmp_path / "x").glob("model.onnx*"))
