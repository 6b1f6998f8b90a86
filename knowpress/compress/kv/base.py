"""The KV-cache policy family: a registry of policy configs that build transformers caches.

A policy is a frozen config (discriminated by ``name``) whose ``make_cache(model)`` returns
the ``transformers.Cache`` a runtime passes as ``past_key_values`` to prefill and to every
decoding step, so the policy acts in both. ``cache_bytes(cache)`` counts what the cache
really holds (packed codes, scales, kept tokens); runtimes divide it by the tokens seen to
report KV bytes per token. A stage attaches a policy with ``ctx.kv_policy = policy``; the
runner saves it in the artifact manifest (``runtime.kv_policy``) and ``load_runtime``
applies it when it scores the artifact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union

from pydantic import Field

from knowpress.config import FrozenConfig
from knowpress.errors import KnowpressError
from knowpress.registry import Registry

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel


class KVPolicy(FrozenConfig):
    name: str

    def make_cache(self, model: PreTrainedModel) -> Cache:
        raise NotImplementedError

    def with_budget(self, budget: int | float) -> KVPolicy:
        """This policy keeping ``budget`` tokens (or that share of the tokens seen)."""
        raise KnowpressError(
            f"budget: {self.name} evicts nothing (its size is set by its own fields); "
            "use an eviction policy or compose one with it"
        )

    def cache_bytes(self, cache: Cache) -> int:
        """Bytes held by ``cache``: a layer's own ``nbytes()`` (quantized layers: codes,
        scales, zeros, full-precision residual), else every key and value tensor."""
        total = 0
        for layer in cache.layers:
            nbytes = getattr(layer, "nbytes", None)
            if callable(nbytes):
                total += int(nbytes())
                continue
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total


#: tokens kept per layer and KV head (an int), or a share of the tokens seen (a float in (0, 1))
Budget = Annotated[
    Union[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0, lt=1)]],  # noqa: UP007
    Field(union_mode="left_to_right"),
]


class EvictionPolicy(KVPolicy):
    """A policy that keeps ``budget`` tokens per layer and KV head (``evicting.py``): each
    decoder layer's cache layer is ``layer_class(*layer_args())``; ``attention`` says it
    scores tokens by attention (the attention-input hooks go on the model)."""

    attention: ClassVar[bool] = False
    layer_class: ClassVar[type]
    budget: Budget = Field(128, description="tokens kept (int) or share of tokens seen (float)")

    def layer_args(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def make_cache(self, model: PreTrainedModel) -> Cache:
        from knowpress.compress.kv.evicting import policy_cache

        return policy_cache(model, lambda: self.layer_class(*self.layer_args()),
                            attention=self.attention)  # fmt: skip

    def with_budget(self, budget: int | float) -> KVPolicy:
        return self.model_copy(update={"budget": budget})


KV_POLICIES: Registry[type[KVPolicy]] = Registry("KV-cache policy")


def policy_from_json(data: dict[str, Any], where: str) -> KVPolicy:
    """Rebuild a saved policy (``{"name": ..., fields}``); unknown names are one clear line."""
    from pydantic import ValidationError

    name = data.get("name")
    if not isinstance(name, str):
        raise KnowpressError(f"{where}: a KV policy needs a 'name'")
    try:
        return KV_POLICIES.get(name).model_validate(data)
    except KnowpressError as exc:
        raise KnowpressError(f"{where}: {exc}") from None
    except ValidationError as exc:
        raise KnowpressError(f"{where}: invalid {name} policy ({exc.errors()[0]['msg']})") from None
