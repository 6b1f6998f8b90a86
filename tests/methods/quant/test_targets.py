"""Quantization targets: module or tensor names, globs and regexes, fused MoE experts, and the
errors that keep a targeted tensor from staying float."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.io import load_model, save_model
from knowpress.methods.quant.base import QuantMethod
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import Target, candidates, identity, select, still_float
from knowpress.pipeline.context import Context
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import Quantize, QuantizeConfig
from knowpress.tensors.packing import dequantize_groups, quantize_groups
from knowpress.testing.models import tiny_llama, tiny_mixtral, tiny_tokenizer

RTN4 = RTN(name="rtn", bits=4, group_size=32)


def names(targets: Sequence[Target]) -> list[str]:
    return [t.name for t in targets]


def test_default_targets_are_linear_layers_and_fused_experts() -> None:
    llama = select(tiny_llama(layers=1), None, ["lm_head"])
    assert names(llama) == [
        f"model.layers.0.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]  # fmt: skip
    moe = {t.name: t for t in select(tiny_mixtral(), None, ["lm_head"])}
    gate_up = moe["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.kind == "fused_experts" and gate_up.shape == (4, 128, 32)  # [E, 2I, H]
    assert moe["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 64)  # [E, H, I]
    # the router (a 2-D weight of its own module, not nn.Linear) and embeddings stay float
    assert "model.layers.0.mlp.gate.weight" not in moe and "model.embed_tokens.weight" not in moe


def test_patterns_match_module_or_tensor_names() -> None:
    model = tiny_llama(layers=2)
    by_module = select(model, ["model.layers.1.mlp.*"], [])
    by_tensor = select(model, ["re:.*layers\\.1\\.mlp\\..*\\.weight"], [])
    assert names(by_module) == names(by_tensor) and len(by_module) == 3
    only_down = select(model, ["*.down_proj.weight"], ["model.layers.0.*"])
    assert names(only_down) == ["model.layers.1.mlp.down_proj.weight"]
    experts = select(tiny_mixtral(), ["*.experts.down_proj"], [])
    assert names(experts) == ["model.layers.0.mlp.experts.down_proj"]


def test_unmatched_and_invalid_patterns_are_errors() -> None:
    with pytest.raises(KnowpressError, match=r"'\*\.dwn_proj' matches no weight tensor .* e\.g\."):
        select(tiny_llama(), ["*.dwn_proj"], [])
    with pytest.raises(KnowpressError, match=r"'re:\(' is not a valid regex"):
        select(tiny_llama(), None, ["re:("])


def test_tied_head_and_embedding_are_seen_as_tied() -> None:
    pool = {t.name: t for t in candidates(tiny_llama())}
    assert pool["lm_head.weight"].tied and pool["model.embed_tokens.weight"].tied
    assert pool["lm_head.weight"].kind == "linear"
    assert pool["model.embed_tokens.weight"].kind == "embedding"
    assert not pool["model.layers.0.mlp.up_proj.weight"].tied


def _run(model: torch.nn.Module, **stage: Any) -> Context:
    data = {"version": 1, "model": {"path": "./unused"},
            "stages": [{"kind": "quantize", **stage}]}  # fmt: skip
    recipe = validate_recipe(data)
    config = recipe.stages[0]
    assert isinstance(config, QuantizeConfig)
    ctx = Context.for_recipe(recipe, model, None, None)  # type: ignore[arg-type]
    return Quantize(config).run(ctx, Progress(enabled=False))


def test_fused_experts_are_quantized_expert_by_expert(tmp_path: Path) -> None:
    model = tiny_mixtral(vocab_size=128)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    ctx = _run(model, method={"name": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    experts = model.model.layers[0].mlp.experts
    assert ctx.metrics["quantized_tensors"] == 4 + 2  # q, k, v, o + the two fused tensors
    assert "gate_up_proj" not in dict(experts.named_parameters(recurse=False))
    for e in range(4):  # each expert alone, with its own scales and zero points
        q = quantize_groups(before[e], 4, 32, symmetric=False)
        expected = dequantize_groups(q.codes, q.scales, q.zeros, 4, 32)
        assert torch.equal(experts.gate_up_proj[e], expected)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router stays float
    embeddings, router_size = 128 * 32 * 2, 4 * 32  # untied embedding and head; the router
    assert ctx.metrics["float_weights_left"] == embeddings + router_size
    save_model(model, tiny_tokenizer(), tmp_path)
    reloaded, _ = load_model(tmp_path)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_a_method_without_fused_support_refuses_fused_experts() -> None:
    fused = next(t for t in candidates(tiny_mixtral()) if t.kind == "fused_experts")
    problem = QuantMethod.check_target(RTN4, fused)  # the family's default: 2-D weights only
    assert problem is not None and "is a fused 3-D expert tensor [4, 128, 32]" in problem
    assert "add 'model.layers.0.mlp.experts'" in problem


def test_targeting_what_the_method_cannot_quantize_is_an_error() -> None:
    model = tiny_llama()
    model.model.extra = torch.nn.Module()  # a 2-D parameter no method knows how to serve
    model.model.extra.weight = torch.nn.Parameter(torch.randn(8, 64))
    with pytest.raises(KnowpressError, match=r"extra\.weight \[8, 64\] is not a linear layer"):
        _run(model, method={"name": "rtn", "bits": 8}, targets=["model.extra"])
    with pytest.raises(KnowpressError, match=r"lm_head\.weight is tied to the input embedding"):
        _run(tiny_llama(), method={"name": "rtn", "bits": 8}, targets=["lm_head"], ignore=[])


def test_a_method_that_leaves_a_target_float_fails_the_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lazy(
        self: RTN,
        model: Any,
        targets: Sequence[Target],
        calibration: Any,
        progress: Any,
        plan: Any,
        onload: Any = None,
    ) -> dict[str, Any]:
        for target in targets[1:]:  # "forgets" the first target
            model.set_submodule(target.module, self.quantize_linear(
                model.get_submodule(target.module)))  # fmt: skip
        return {}

    monkeypatch.setattr(RTN, "apply", lazy)
    with pytest.raises(KnowpressError, match=r"1 targeted tensor\(s\) still float after rtn "
                       r"\(first: model\.layers\.0\.self_attn\.q_proj\.weight\)"):  # fmt: skip
        _run(tiny_llama(), method={"name": "rtn", "bits": 4, "group_size": 32})


def test_still_float_sees_a_requantized_layer_that_was_not_replaced() -> None:
    model = tiny_llama(layers=1)
    targets = select(model, ["*.q_proj"], [])
    RTN4.apply(model, targets, None, Progress(enabled=False))  # type: ignore[arg-type]
    before = {t.name: identity(model, t) for t in select(model, ["*.q_proj"], [])}
    assert still_float(model, targets, before) == ["model.layers.0.self_attn.q_proj.weight"]
    RTN4.apply(model, targets, None, Progress(enabled=False))  # type: ignore[arg-type]
    assert still_float(model, targets, before) == []
