"""KV-cache policies: each registers in KV_POLICIES; runtimes build their caches from one."""

from knowpress.methods.kv import (  # noqa: F401  (registers them)
    compose,
    full,
    gear,
    h2o,
    head_budget,
    kivi,
    rkv,
    snapkv,
    streaming,
)
from knowpress.methods.kv.base import KV_POLICIES, KVPolicy, policy_from_json

__all__ = ["KV_POLICIES", "KVPolicy", "policy_from_json"]
