"""``kind: compress_kv`` — attach a KV-cache policy: evaluation, generation and every later
artifact run with it (saved in the manifest as ``runtime.kv_policy``).

```yaml
- kind: compress_kv
  policy: {name: snapkv, window: 16}
  budget: 0.25          # tokens kept (int) or share of the tokens seen (float), per layer
```

``budget`` overrides the eviction policy's own (for ``compose``, its eviction member's); a
quantization-only policy (kivi, gear) has none and is refused with one line.

The weights are unchanged. Details: the cache bytes per token after a prefill of
``KV_PROBE_TOKENS`` tokens with the policy and with the full cache, both with full-precision
keys and values in the deploy dtype (``model.dtype``, bfloat16 by default), and their ratio.
The policy is checked against the model before any work (``KVPolicy.check``: a KIVI group
that does not divide the head dim, probes longer than the context, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.kv.base import Budget
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig

PolicySpec = Annotated[
    Union[tuple(KV_POLICIES.get(n) for n in KV_POLICIES.names())],  # noqa: UP007
    Field(discriminator="name"),
]


@STAGES.register("compress_kv")
class CompressKVConfig(StageConfig):
    summary = "attach a KV-cache policy (eviction / quantization) as a runtime policy"

    kind: Literal["compress_kv"]
    policy: PolicySpec  # type: ignore[valid-type]
    budget: Budget | None = None

    @model_validator(mode="after")
    def _budget_applies(self) -> CompressKVConfig:
        if self.budget is not None:
            try:
                self.policy.with_budget(self.budget)
            except KnowpressError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def effective_policy(self) -> Any:
        """The policy with the stage's ``budget`` applied."""
        return self.policy if self.budget is None else self.policy.with_budget(self.budget)

    def build(self) -> CompressKV:
        return CompressKV(self)

    def attaches(self) -> dict[str, Any]:
        return {"kv_policy": self.effective_policy}

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        from knowpress.methods.kv.base import CacheShape

        policy = self.effective_policy
        policy.check(CacheShape.of(model), "torch")  # the runtime that scores this stage
        return [f"KV policy {policy.name}: " + ", ".join(
            f"{k} {v}" for k, v in policy.model_dump().items() if k != "name")]  # fmt: skip


class CompressKV:
    def __init__(self, config: CompressKVConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.runtimes.torch import TorchRuntime

        policy = self.config.effective_policy
        dtype = ctx.deploy_dtype  # both caches counted as deployed
        full = TorchRuntime(ctx.model, ctx.tokenizer, kv_dtype=dtype).kv_bytes_per_token()
        held = TorchRuntime(ctx.model, ctx.tokenizer, kv_policy=policy,
                            kv_dtype=dtype).kv_bytes_per_token()  # fmt: skip
        ctx.kv_policy = policy
        ctx.metrics.update(kv_bytes_per_token=held, full_kv_bytes_per_token=full, kv_dtype=dtype,
                           kv_ratio=round(held / full, 5) if full else None)  # fmt: skip
        progress.log(f"[dim]compress_kv: {policy.name}, {held / full:.3f} of the full cache[/dim]")
        return ctx
