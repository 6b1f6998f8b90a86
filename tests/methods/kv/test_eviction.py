"""Every eviction policy is exact when its budget holds every token: the same greedy tokens
as the full cache on left-padded dense and MoE batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kv_helpers import MODELS, generate, left_padded, sharpen

from knowpress.methods.kv import KV_POLICIES

#: eviction policy -> a block whose budget holds the 20-token prompt and 10 new tokens
FULL_BUDGET: dict[str, dict[str, Any]] = {
    "streaming": {"name": "streaming", "sinks": 4, "budget": 68},
    "h2o": {"name": "h2o", "budget": 80},
    "snapkv": {"name": "snapkv", "budget": 80},
    "rkv": {"name": "rkv", "budget": 80},
    # the least important head still gets floor · budget = 60 tokens
    "head_budget": {
        "name": "head_budget",
        "policy": {"name": "snapkv"},
        "budget": 200,
        "probe_length": 24,
    },
}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(FULL_BUDGET))
@torch.inference_mode()
def test_a_budget_holding_everything_is_exact(name: str, arch: str) -> None:
    model = sharpen(MODELS[arch]())
    ids, mask = left_padded([20, 13, 7])
    policy = KV_POLICIES.get(name).model_validate(FULL_BUDGET[name])
    assert torch.equal(generate(model, ids, mask, policy.make_cache(model)),
                       generate(model, ids, mask, None))  # fmt: skip


def test_every_eviction_policy_has_a_full_budget_row() -> None:
    from knowpress.methods.kv.base import EvictionPolicy

    evicting = {n for n in KV_POLICIES.names() if issubclass(KV_POLICIES.get(n), EvictionPolicy)}
    assert evicting <= set(FULL_BUDGET), f"add {sorted(evicting - set(FULL_BUDGET))} above"
