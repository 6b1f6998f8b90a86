"""KV-cache policies: each registers in KV_POLICIES; runtimes build their caches from one."""

from knowpress.compress.kv import full, gear, h2o, kivi, rkv, snapkv, streaming  # noqa: F401
from knowpress.compress.kv.base import KV_POLICIES, KVPolicy, policy_from_json

__all__ = ["KV_POLICIES", "KVPolicy", "policy_from_json"]
