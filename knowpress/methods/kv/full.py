"""``full``: the uncompressed KV cache (transformers ``DynamicCache``).

Every key and value of every layer is kept in the compute dtype:
``bytes/token = 2 · layers · kv_heads · head_dim · itemsize``. The baseline every
compressed policy's bytes and retention are measured against.

```yaml
runtime policy: {name: full}
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from knowpress.methods.kv.base import KV_POLICIES, CacheShape, KVPolicy, Probe

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel


@KV_POLICIES.register("full")
class FullCache(KVPolicy):
    summary = "the uncompressed cache (DynamicCache): the baseline of every KV policy"
    paper = "—"

    name: Literal["full"]

    def layers(self, shape: CacheShape, probe: Probe | None = None) -> list[Any]:
        from transformers.cache_utils import DynamicLayer

        return [DynamicLayer() for _ in range(shape.layers)]

    def make_cache(self, model: PreTrainedModel) -> Cache:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
