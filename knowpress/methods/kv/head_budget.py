"""``head_budget``: per-head KV budgets from measured head importance, wrapping an eviction
policy (importance: Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv:2404.15574; allocation: HeadKV, Fu et al. 2024, arXiv:2410.19258).

Once per model the copy probes of ``head_importance.py`` score every (layer, KV head), and
head ``n`` gets ``b_n = floor · c + (1 − floor) · c · N · s_n / Σ s`` tokens (``c`` = the
average ``budget``: tokens, or ``⌈budget · seen⌉``; ``N`` = layers × KV heads; the ``b_n``
sum to exactly ``c · N``; no head gets more than the tokens seen, what a head cannot hold
going to the others, ``head_importance.allocate``). The wrapped policy (streaming, h2o,
snapkv, rkv; its own budget replaced by ``budget``) ranks the stored + new tokens of each
head exactly as it would alone (its layer's ``priority``); head ``n`` keeps its top ``b_n``
of them, pads first evicted.

Storage: each layer holds its kept tokens flat, head after head: ``keys``/``values``
``[B, Σ_h n_h, D]``, ``pos [B, Σ_h n_h]`` and the counts ``n_h``; no padding is held, so
``nbytes = B · Σ_h n_h · D · 2 · itemsize``. Within a forward the layer unpacks them into a
``[B, H, max_h n_h + q, D]`` layout (dead slots in front of each head's tokens, then the new
tokens) and returns it; a per-head mask then hides the dead slots.

Attention: transformers builds one mask ``[B, 1, q, kv]`` for all heads, so make_cache
switches the model to the attention implementation ``knowpress_head_budget`` (registered in
``AttentionInterface`` and ``ALL_MASK_ATTENTION_FUNCTIONS`` with sdpa's mask): sdpa, whose
mask over the stored slots is the layer's per-head ``[B, H, S]`` live-and-real mask and over
the new tokens the model's own causal/padding mask. For any other cache (or a full budget)
it is sdpa itself; the policy needs a model on sdpa or eager attention.

```yaml
runtime policy: {name: head_budget, policy: {name: snapkv, window: 16}, budget: 0.25,
                 floor: 0.3, probes: 8, probe_length: 64}
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator

from knowpress.core.errors import KnowpressError
from knowpress.formats.onnx.policy_io import PAST_VALID, QUERIES
from knowpress.methods.kv.attention import attention_modules, check_supported
from knowpress.methods.kv.base import (
    KV_POLICIES,
    Budget,
    CacheShape,
    EvictionPolicy,
    KVPolicy,
    Probe,
    float_nbytes,
)
from knowpress.methods.kv.evicting import PAD_KEY, EvictingLayer, policy_cache
from knowpress.methods.kv.head_importance import (
    allocate,
    check_probe,
    retrieval_scores,
    torch_probe,
)
from knowpress.tensors.kv_masks import head_mask

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

ATTENTION = "knowpress_head_budget"
STASH = "_knowpress_head_mask"  # on an attention module: (keys returned, live [B, H, S])


def head_budget_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """sdpa with the per-head mask a ``HeadBudgetLayer`` stashed for exactly these ``key``
    states (identity check, so another cache on the same model gets plain sdpa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    stash = module.__dict__.pop(STASH, None)
    if stash is not None and stash[0] is key:
        attention_mask = head_mask(stash[1], attention_mask, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_head_attention(model: Any) -> None:
    """Register ``knowpress_head_budget`` and switch ``model`` to it (sdpa or eager only)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, head_budget_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    current = model.config._attn_implementation
    if current == ATTENTION:
        return
    if current not in ("sdpa", "eager"):
        raise KnowpressError(
            f"head_budget masks each head through sdpa; the model's attention is {current!r}: "
            "load it with attn_implementation='sdpa'"
        )
    model.set_attn_implementation(ATTENTION)


class HeadBudgetLayer(EvictingLayer):
    """Keeps ``allocation(capacity())[index][h]`` tokens in KV head ``h``, ranked by the
    wrapped ``inner`` layer; stored flat (see the module docstring). ``modules``: a torch
    model's attention modules, which read the per-head mask this layer stashes; None in the
    onnxruntime loop, whose graph reads ``past()``'s mask as its ``past_valid`` input."""

    def __init__(self, inner: EvictingLayer, budget: int | float, allocation: Any,
                 modules: list[Any] | None) -> None:  # fmt: skip
        self.inner = inner
        super().__init__(budget)
        self.allocation, self.modules = allocation, modules
        self.counts: list[int] | None = None  # n_h: tokens held per KV head

    # the cache sets owner and index on the layers it holds; the inner layer reads them too
    @property
    def owner(self) -> Any:
        return self.inner.owner

    @owner.setter
    def owner(self, value: Any) -> None:
        self.inner.owner = value

    @property
    def index(self) -> int:
        return self.inner.index

    @index.setter
    def index(self, value: int) -> None:
        self.inner.index = value

    def stored(self) -> int:
        return max(self.counts) if self.counts else 0

    def nbytes(self, float_bytes: int | None = None) -> int:
        if not self.counts:
            return 0
        return sum(float_nbytes(t, float_bytes) for t in (self.keys, self.values))

    def past(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Keys, values ``[B, H, max_h n_h, D]`` (each head's dead slots first) and which
        slots hold a live real token ``[B, H, S]``."""
        if not self.counts:
            return None
        b, h = self.keys.shape[0], len(self.counts)
        empty = [t.new_zeros(b, h, 0, t.shape[-1]) for t in (self.keys, self.values)]
        keys, values, pos, live = self.joined(*empty)
        return keys, values, self._valid(pos) & live

    def joined(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Stored + new keys, values ``[B, H, S, D]``, positions ``[B, H, S]`` and which
        slots hold a token ``live [H, S]`` (each head's dead slots come first)."""
        b, h, q, _ = key_states.shape
        device = key_states.device
        new = torch.arange(self.seen, self.seen + q, device=device).expand(b, h, q)
        fresh = torch.ones(h, q, dtype=torch.bool, device=device)
        if not self.counts:
            return key_states, value_states, new, fresh
        counts = torch.tensor(self.counts, device=device)
        s = int(counts.max())
        slot = torch.arange(s, device=device)
        front = (s - counts)[:, None]  # [H, 1] dead slots of each head
        start = (counts.cumsum(0) - counts)[:, None]  # where each head's tokens start
        src = (start + slot - front).clamp(0, self.keys.shape[1] - 1)  # [H, S]
        keys = torch.cat([self.keys[:, src], key_states], dim=2)
        values = torch.cat([self.values[:, src], value_states], dim=2)
        pos = torch.cat([self.pos[:, src], new], dim=-1)  # type: ignore[index]
        return keys, values, pos, torch.cat([slot >= front, fresh], dim=-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        q = key_states.shape[-2]
        module = None if self.modules is None else self.modules[self.index]
        if module is not None and module.config._attn_implementation != ATTENTION:
            raise KnowpressError(  # else dead slots would be read
                f"head_budget: the model's attention became {module.config._attn_implementation!r}"
                f" after its cache was built; keep {ATTENTION!r} while the cache is in use"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values, pos, live = self.joined(key_states, value_states)
        self.seen += q
        self.inner.seen = self.seen
        valid = self._valid(pos) & live
        self.inner.observe(pos, valid, keys)
        if module is not None:  # this forward attends to every live real slot, new ones masked
            module.__dict__[STASH] = (keys, valid[..., : keys.shape[2] - q])  # by the model
        sizes = live.sum(-1)  # [H]: n_h + q
        budget = self.allocation(self.capacity(), self.seen)[self.index].to(sizes.device)
        keep = torch.where(sizes > budget + self.inner.slack(), budget, sizes)
        if torch.equal(keep, sizes):
            score = torch.zeros(pos.shape, device=keys.device)
        else:
            score = self.inner.priority(pos, valid, keys)
        # pads first, the earliest kept when some must be (as EvictingLayer.update ranks)
        score = torch.where(valid, score.double(), -PAD_KEY - pos.double())
        self.select(keys, values, pos, score.masked_fill(~live, float("-inf")), keep)
        return keys, values

    def select(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
               score: torch.Tensor, keep: torch.Tensor) -> None:  # fmt: skip
        """Store each head's top ``keep[h]`` tokens by ``score [B, H, S]`` flat, in position
        order; the inner layer's per-token state follows the next forward's layout."""
        b, h, s, d = keys.shape
        k = int(keep.max())
        slot = torch.arange(k, device=keys.device)
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # ties: earlier
        top = top.masked_fill(slot >= keep[:, None], s).sort(-1).values  # kept ones first
        front = (k - keep)[:, None]  # [H, 1] dead slots of the next layout
        held = slot >= front  # [H, K]
        aligned = top.gather(-1, (slot - front).clamp_min(0).expand(b, h, k))
        aligned = aligned.masked_fill(~held, 0)  # [B, H, K] into the joined layout
        self.inner.kept(aligned)
        gather = aligned[..., None].expand(b, h, k, d)
        self.keys = keys.gather(2, gather)[:, held]  # [B, Σ keep, D]
        self.values = values.gather(2, gather)[:, held]
        self.pos = pos.gather(-1, aligned)[:, held]
        self.counts = keep.tolist()

    def reset(self) -> None:
        super().reset()
        self.counts = None
        self.inner.reset()

    def _each_state(self, change: Any) -> None:
        super()._each_state(change)
        self.inner._each_state(change)  # h2o scores, snapkv's window queries


def _member(value: Any) -> EvictionPolicy:
    from knowpress.methods.kv.base import policy_from_json

    member = value if isinstance(value, KVPolicy) else policy_from_json(value, "head_budget.policy")
    if not isinstance(member, EvictionPolicy):
        raise ValueError(
            f"policy: head_budget wraps an eviction policy (streaming, h2o, snapkv, rkv), "
            f"got {member.name}"
        )
    return member


@KV_POLICIES.register("head_budget")
class HeadBudgetPolicy(KVPolicy):
    summary = "per-head budgets from retrieval-probe head importance, wrapping an eviction policy"
    paper = "Wu et al. 2024 (retrieval heads), arXiv:2404.15574; Fu et al. 2024 (HeadKV)"

    name: Literal["head_budget"]
    policy: SerializeAsAny[EvictionPolicy] = Field(description="the eviction policy that ranks")
    budget: Budget = Field(128, description="average tokens per head (int) or share of seen")
    floor: float = Field(0.3, ge=0, le=1, description="share of the budget every head gets")
    probes: int = Field(8, ge=1, description="copy probes measuring head importance")
    probe_length: int = Field(64, ge=2, description="tokens per copy (a probe is twice this)")

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> EvictionPolicy:
        return _member(value)

    def with_budget(self, budget: int | float) -> KVPolicy:
        return self.model_validate({**self.model_dump(), "budget": budget})

    def graph_io(self) -> frozenset[str]:
        return frozenset({QUERIES, PAST_VALID})  # probes read queries; heads mask their past

    def check(self, shape: CacheShape, runtime: str = "torch") -> None:
        if runtime == "torch":
            check_supported(shape.model_type, "head_budget")
        check_probe(shape, self.probe_length)
        self.policy.check(shape, runtime)

    def importance(self, probe: Probe, shape: CacheShape) -> torch.Tensor:
        """``[layers, kv_heads]`` copy scores, measured once per model (``probe.memo``)."""
        key = (self.probes, self.probe_length)
        if key not in probe.memo:
            probe.memo[key] = retrieval_scores(probe, shape, self.probes, self.probe_length)
        return probe.memo[key]

    def layers(self, shape: CacheShape, probe: Probe | None = None,
               modules: list[Any] | None = None) -> list[Any]:  # fmt: skip
        if probe is None:
            raise KnowpressError("head_budget measures its heads first: it needs a probe")
        importance, floor, memo = self.importance(probe, shape), self.floor, {}
        n_heads = importance.numel()

        def allocation(capacity: int, seen: int) -> torch.Tensor:
            # the cap binds only while a head's share exceeds the tokens seen
            key = (capacity, seen if seen < capacity * (1 + (1 - floor) * n_heads) else None)
            if key not in memo:
                memo[key] = allocate(importance, capacity, floor, key[1])
            return memo[key]

        inner = self.policy.with_budget(self.budget)
        return [HeadBudgetLayer(inner.layer_class(*inner.layer_args()),  # type: ignore[attr-defined]
                                self.budget, allocation, modules)
                for _ in range(shape.layers)]  # fmt: skip

    def make_cache(self, model: PreTrainedModel) -> Cache:
        shape = CacheShape.of(model)
        self.check(shape)
        use_head_attention(model)  # before the probes: an unusable attention is one line
        layers = self.layers(shape, torch_probe(model), attention_modules(model, self.name))
        return policy_cache(model, layers, attention=self.policy.attention)
