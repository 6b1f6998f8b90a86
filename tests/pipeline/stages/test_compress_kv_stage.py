"""``kind: compress_kv``: the stage's ``budget`` sets the eviction policy's (or a
composition's eviction member's), a quantization-only policy refuses one in one line, and
the stage records the bytes per token its policy holds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from knowpress.core.progress import Progress
from knowpress.pipeline.stages.compress_kv import CompressKVConfig
from knowpress.testing.models import tiny_llama, tiny_tokenizer


def test_the_budget_reaches_the_eviction_policy() -> None:
    stage = CompressKVConfig.model_validate(
        {"kind": "compress_kv", "policy": {"name": "snapkv", "budget": 64}, "budget": 0.25}
    )
    assert stage.effective_policy.budget == 0.25 and stage.policy.budget == 64  # fmt: skip
    composed = CompressKVConfig.model_validate({"kind": "compress_kv", "budget": 32, "policy": {
        "name": "compose", "policies": [{"name": "h2o"}, {"name": "kivi"}]}})  # fmt: skip
    assert composed.effective_policy.eviction.budget == 32


def test_a_budget_for_a_quantization_only_policy_is_one_line() -> None:
    with pytest.raises(ValidationError, match="kivi evicts nothing"):
        CompressKVConfig.model_validate(
            {"kind": "compress_kv", "policy": {"name": "kivi"}, "budget": 0.5})  # fmt: skip


def test_the_stage_records_the_share_of_the_cache_kept() -> None:
    stage = CompressKVConfig.model_validate(
        {"kind": "compress_kv", "policy": {"name": "streaming"}, "budget": 0.25})  # fmt: skip
    ctx = SimpleNamespace(model=tiny_llama(), tokenizer=tiny_tokenizer(), metrics={},
                          kv_policy=None, deploy_dtype="bfloat16")  # fmt: skip
    stage.build().run(ctx, Progress(enabled=False))  # type: ignore[arg-type]
    assert ctx.kv_policy.budget == 0.25
    assert ctx.metrics["kv_ratio"] == pytest.approx(0.25, abs=0.01)
    # the full cache as deployed (bfloat16): K and V x 2 layers x 2 KV heads x 16 x 2 bytes
    assert ctx.metrics["full_kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert ctx.metrics["kv_dtype"] == "bfloat16"


def test_a_quantized_cache_saves_against_the_deploy_dtype_not_float32() -> None:
    """4-bit KIVI codes against a bf16 cache save about 4x, not the 8x a float32 one shows."""
    stage = CompressKVConfig.model_validate({"kind": "compress_kv", "policy": {
        "name": "kivi", "bits": 4, "group_size": 16, "residual": 0}})  # fmt: skip
    ratios = {}
    for dtype in ("bfloat16", "float32"):
        ctx = SimpleNamespace(model=tiny_llama(), tokenizer=tiny_tokenizer(), metrics={},
                              kv_policy=None, deploy_dtype=dtype)  # fmt: skip
        stage.build().run(ctx, Progress(enabled=False))  # type: ignore[arg-type]
        ratios[dtype] = 1 / ctx.metrics["kv_ratio"]
    # codes 4 bits + fp16 scale and zero per 16 values (keys per channel, values per token)
    per_value = 4 / 8 + 2 * 2 / 16
    assert ratios["bfloat16"] == pytest.approx(2 / per_value, rel=0.01)  # 2.67x
    assert ratios["float32"] == pytest.approx(4 / per_value, rel=0.01)


def _plan(stages: list[dict], model: object) -> list[list[str]]:
    from knowpress.pipeline.preflight import check_stages
    from knowpress.pipeline.recipe import validate_recipe

    recipe = validate_recipe({"version": 1, "model": {"world": "test-tiny"}, "stages": stages})
    return check_stages(recipe, model)


def test_policies_are_checked_against_the_model_and_the_export_runtime_before_work() -> None:
    """``--dry-run`` and the runner refuse what would fail after the reference is scored:
    a KIVI group that does not divide the head dim, an expert-skip policy before export."""
    from knowpress.core.errors import KnowpressError
    from knowpress.testing.models import tiny_moe

    model = tiny_llama()  # head dim 16
    refused = r"stages.0 \(compress_kv\): kivi: group_size 32 does not divide the head dim 16"
    with pytest.raises(KnowpressError, match=refused):
        _plan([{"kind": "compress_kv", "policy": {"name": "kivi"}}], model)
    export = {"kind": "export", "weights": "float32"}
    compose = [{"name": "rkv"}, {"name": "kivi", "group_size": 16}]
    for policy in ({"name": "head_budget", "policy": {"name": "snapkv"}, "probe_length": 16},
                   {"name": "compose", "policies": compose}):  # fmt: skip
        plan = _plan([{"kind": "compress_kv", "policy": policy}, export], model)
        assert plan[1] == ["export onnx, weights float32"]
    skip = [{"kind": "skip_experts"}, export]
    with pytest.raises(KnowpressError, match=r"stages.1 \(export\): expert_skip cannot run in "
                       "the onnxruntime loop"):  # fmt: skip
        _plan(skip, tiny_moe("mixtral", layers=2))
