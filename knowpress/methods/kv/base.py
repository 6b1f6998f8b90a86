"""The KV-cache policy family: a registry of policy configs that build cache layers.

A policy is a frozen config (discriminated by ``name``) whose ``layers(shape, probe)`` are
the cache layers one runtime drives: ``make_cache(model)`` wraps them in the
``transformers.Cache`` a ``TorchRuntime`` passes as ``past_key_values`` to prefill and to
every decoding step; the onnxruntime loop (``runtimes/ort_session.py``) feeds the same layers the
keys and values its graph returns and reads their ``past()`` back, so each rule is written
once and acts in both runtimes. ``cache_bytes(cache, float_bytes)`` counts what the cache
really holds (packed codes, scales, kept tokens), full-precision keys and values at the
deploy dtype's width; runtimes divide it by the tokens seen to report KV bytes per token.
A stage attaches a policy with ``ctx.kv_policy = policy``; the runner saves it in the
artifact manifest (``runtime.kv_policy``) and ``load_runtime`` applies it when it scores the
artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError
from knowpress.core.registry import Registry
from knowpress.formats.onnx.policy_io import QUERIES  # the graph I/O names

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel


@dataclass
class CacheShape:
    """What a policy needs to know of the model whose cache it builds (from a transformers
    config or an exported graph's spec): layer count, key head dim, the vocabulary and its
    special ids (``head_budget``'s probes), the context length."""

    layers: int
    head_dim: int
    vocab_size: int
    special_ids: frozenset[int] = frozenset()
    max_positions: int | None = None
    model_type: str = "?"

    @classmethod
    def of(cls, model: Any) -> CacheShape:
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id")}
        eos = getattr(config, "eos_token_id", None)
        special |= set(eos) if isinstance(eos, list) else {eos}
        limit = getattr(config, "max_position_embeddings", None)
        return cls(int(config.num_hidden_layers), int(head_dim), int(config.vocab_size),
                   frozenset(s for s in special if isinstance(s, int)),
                   limit if isinstance(limit, int) else None,
                   str(getattr(config, "model_type", "?")))  # fmt: skip


#: per layer, the post-rotary queries ``[P, H_kv, G, S, D]`` (float32), the keys
#: ``[P, H_kv, S, D]`` and the attention scaling of a forward over ``ids [P, S]``
ProbeResult = list[tuple["torch.Tensor", "torch.Tensor", float]]


@dataclass
class Probe:
    """A runtime's way to run a probe forward (``head_budget``'s copy probes): ``run(ids)``
    and a ``memo`` kept as long as the model (scores measured once per model)."""

    run: Callable[[torch.Tensor], ProbeResult]
    memo: dict[Any, Any] = field(default_factory=dict)


class KVPolicy(FrozenConfig):
    name: str

    def layers(self, shape: CacheShape, probe: Probe | None = None) -> list[Any]:
        """One cache layer per decoder layer (``probe``: for policies that measure the model
        first)."""
        raise NotImplementedError

    def make_cache(self, model: PreTrainedModel) -> Cache:
        """The ``layers`` in a ``transformers.Cache`` for a torch model."""
        from transformers.cache_utils import Cache

        return Cache(layers=self.layers(CacheShape.of(model)))

    def check(self, shape: CacheShape, runtime: str = "torch") -> None:
        """One line when this policy cannot run on a model of ``shape`` in ``runtime``
        (``torch`` or ``onnxruntime``), before any work."""

    def graph_io(self) -> frozenset[str]:
        """Extra graph I/O the onnxruntime loop needs for this policy (``QUERIES``,
        ``PAST_VALID``); an exported graph carries them (``formats/onnx/policy_io.py``)."""
        return frozenset()

    def with_budget(self, budget: int | float) -> KVPolicy:
        """This policy keeping ``budget`` tokens (or that share of the tokens seen)."""
        raise KnowpressError(
            f"budget: {self.name} evicts nothing (its size is set by its own fields); "
            "use an eviction policy or compose one with it"
        )

    def cache_bytes(self, cache: Any, float_bytes: int | None = None) -> int:
        """Bytes held by ``cache``: a layer's own ``nbytes(float_bytes)`` (quantized layers:
        codes, scales, zeros, full-precision residual), else every key and value tensor;
        full-precision keys and values count ``float_bytes`` each (the deploy dtype's
        width; None: as held)."""
        total = 0
        for layer in cache.layers:
            nbytes = getattr(layer, "nbytes", None)
            if callable(nbytes):
                total += int(nbytes(float_bytes))
                continue
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None:
                    total += float_nbytes(tensor, float_bytes)
        return total


def float_nbytes(tensor: torch.Tensor, float_bytes: int | None) -> int:
    """Bytes of a full-precision key/value tensor at ``float_bytes`` per element."""
    size = float_bytes if float_bytes is not None and tensor.is_floating_point() else None
    return tensor.numel() * (size or tensor.element_size())


def _budget(value: Any) -> Any:
    """Tokens (an int ≥ 1) or a share of the tokens seen (a float in (0, 1)); a bool or a
    whole float is refused rather than read as a token count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{value!r} is not a budget: give a token count (an int >= 1) or a share of the "
            "tokens seen (a float in (0, 1))"
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(
            f"{value!r} is not a share in (0, 1) (a float budget is a share of the tokens "
            f"seen; {value:g} would keep {'every token' if value >= 1 else 'nothing'}); "
            "give a token count as an int, e.g. 128"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{value} tokens: a budget keeps at least 1 token")
    return value


#: tokens kept per layer and KV head (an int), or a share of the tokens seen (a float in (0, 1))
Budget = Annotated[int | float, BeforeValidator(_budget)]


class EvictionPolicy(KVPolicy):
    """A policy that keeps ``budget`` tokens per layer and KV head (``evicting.py``): each
    decoder layer's cache layer is ``layer_class(*layer_args())``; ``attention`` says it
    scores tokens by attention (queries from the attention-input hooks on a torch model, or
    the graph's ``queries`` outputs in the onnxruntime loop)."""

    attention: ClassVar[bool] = False
    layer_class: ClassVar[type]
    budget: Budget = Field(128, description="tokens kept (int) or share of tokens seen (float)")

    def layer_args(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def layers(self, shape: CacheShape, probe: Probe | None = None) -> list[Any]:
        return [self.layer_class(*self.layer_args()) for _ in range(shape.layers)]

    def make_cache(self, model: PreTrainedModel) -> Cache:
        from knowpress.methods.kv.evicting import policy_cache

        return policy_cache(model, self.layers(CacheShape.of(model)), attention=self.attention)

    def check(self, shape: CacheShape, runtime: str = "torch") -> None:
        if self.attention and runtime == "torch":
            from knowpress.methods.kv.attention import check_supported

            check_supported(shape.model_type, self.name)

    def graph_io(self) -> frozenset[str]:
        return frozenset({QUERIES}) if self.attention else frozenset()

    def with_budget(self, budget: int | float) -> KVPolicy:
        return self.model_validate({**self.model_dump(), "budget": budget})


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
