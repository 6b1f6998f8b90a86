"""``kind: compress_kv``: the stage's ``budget`` sets the eviction policy's (or a
composition's eviction member's), a quantization-only policy refuses one in one line, and
the stage records the bytes per token its policy holds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from knowpress.progress import Progress
from knowpress.stages.compress_kv import CompressKVConfig
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
                          kv_policy=None)  # fmt: skip
    stage.build().run(ctx, Progress(enabled=False))  # type: ignore[arg-type]
    assert ctx.kv_policy.budget == 0.25
    assert ctx.metrics["kv_ratio"] == pytest.approx(0.25, abs=0.01)
