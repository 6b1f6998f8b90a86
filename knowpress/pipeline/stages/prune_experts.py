"""``kind: prune_experts`` — remove a share of each MoE block's routed experts.

Statistics come from the model on ``data.calibration`` (``methods/experts/stats.py``); the
method scores every expert (``EXPERT_PRUNERS``: reap, frequency, routing_weight, merge), the
budget picks the experts to cut (``methods/experts/budget.py``), and the surgery slices the
fused expert tensors and the router rows together (``arch/moe.py``). Before cutting, the
redundancy pre-check estimates the tolerated sparsity (``methods/experts/precheck.py``) and
warns, or stops with ``on_risk: fail``. Shared experts are never pruned; top-k is unchanged.

```yaml
- kind: prune_experts
  method: {name: reap}          # reap | frequency | routing_weight | merge
  sparsity: 0.5                 # share of experts removed
  budget: per_layer             # per_layer: uniform count (stock transformers loads it);
                                # global: uneven counts (knowpress loads them, from the manifest)
  precheck: {max_kl: 0.1, on_risk: warn}
```
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field

from knowpress.arch.moe import arch_of, moe_blocks
from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.weights import packed_modules
from knowpress.methods.experts import EXPERT_PRUNERS, expert_stats
from knowpress.methods.experts.budget import prune_blocks
from knowpress.methods.experts.precheck import PrecheckSpec, precheck
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig

PrunerSpec = Annotated[
    Union[tuple(EXPERT_PRUNERS.get(n) for n in EXPERT_PRUNERS.names())],  # noqa: UP007
    Field(discriminator="name"),
]


@STAGES.register("prune_experts")
class PruneExpertsConfig(StageConfig):
    summary = "remove a share of each MoE block's routed experts (REAP and baselines)"
    paper = "Lasby et al. 2025 (REAP), arXiv:2510.13999"

    kind: Literal["prune_experts"]
    blockwise = True
    method: PrunerSpec = Field(default_factory=lambda: EXPERT_PRUNERS.get("reap")(name="reap"))  # type: ignore[valid-type]
    sparsity: float = Field(gt=0, lt=1, description="share of routed experts removed")
    budget: Literal["per_layer", "global"] = "per_layer"
    min_tokens: int = Field(8, ge=0, description="experts below this many tokens are flagged")
    precheck: PrecheckSpec = PrecheckSpec()
    trains_weights = True  # slices float expert tensors: before any quantize stage

    def build(self) -> PruneExperts:
        return PruneExperts(self)

    def uneven_structure(self) -> bool:
        return self.budget == "global"

    def structure_after(self, model: Any) -> Any:
        """A per-layer budget's uniform count on the meta device (global: counts unknown
        until the statistics are measured, so later stages see the unpruned shapes)."""
        if self.budget != "per_layer":
            return model
        import copy

        config = copy.deepcopy(model.config)
        arch = arch_of(config)
        count = getattr(config, arch.count_key)
        setattr(config, arch.count_key, count - round(self.sparsity * count))
        with torch.device("meta"):
            return type(model)(config)

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        arch = arch_of(model.config)
        if packed_modules(model):
            raise KnowpressError(
                "prune_experts slices float expert tensors, and the model has packed layers "
                "from an earlier quantize stage: put prune_experts before quantize"
            )
        blocks = moe_blocks(model)
        for b in blocks:
            left = b.num_experts - round(self.sparsity * b.num_experts)
            if self.budget == "per_layer" and left < b.top_k:
                raise KnowpressError(
                    f"sparsity: {self.sparsity} keeps {left} of {b.num_experts} experts in "
                    f"{b.name}, fewer than its top-k ({b.top_k}); lower the sparsity"
                )
            if b.groups > 1 and self.budget == "global":
                raise KnowpressError(
                    "budget: global leaves uneven counts the grouped router cannot split; "
                    "use budget: per_layer"
                )
            problem = b.group_problem(left) if self.budget == "per_layer" else None
            if problem:
                raise KnowpressError(f"sparsity: {problem}")
        count = getattr(model.config, arch.count_key)
        return [f"{self.method.name}: remove {self.sparsity:.0%} of {count} experts in "
                f"{len(blocks)} blocks ({self.budget})"]  # fmt: skip


class PruneExperts:
    def __init__(self, config: PruneExpertsConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.pipeline.blockwise import onload_for
        from knowpress.pipeline.calibration import calibration_batches

        cfg, model = self.config, ctx.model
        cfg.check(model, ctx.deploy_dtype)
        positions = int(getattr(model.config, "max_position_embeddings", 2048))
        sequences = ctx.calibration_ids(positions)
        probe_n = cfg.precheck.probe_samples if cfg.precheck.enabled else 0
        if len(sequences) <= probe_n:
            raise KnowpressError(
                f"data.calibration: {len(sequences)} sequences, but the pre-check probes "
                f"{probe_n} of them and statistics need the rest; raise data.calibration.samples"
            )
        batches = calibration_batches(sequences[: len(sequences) - probe_n])
        blocks = moe_blocks(model)
        progress.log(f"[dim]prune_experts: statistics on {len(batches)} batches[/dim]")
        onload = onload_for(ctx)
        stats = expert_stats(model, batches, onload=onload)
        if cfg.precheck.enabled:
            probe = calibration_batches(sequences[-probe_n:])
            estimate = precheck(model, blocks, stats, cfg.method, cfg.budget, probe,
                                cfg.precheck, cfg.sparsity, onload)  # fmt: skip
            ctx.metrics["precheck"] = estimate
            _report_risk(estimate, cfg, progress)
        keeps, structure = prune_blocks(model, blocks, stats, cfg.method, cfg.sparsity, cfg.budget)
        ctx.structure.pop("experts_per_layer", None)  # an earlier uneven cut is superseded
        ctx.structure.update(structure)
        ctx.metrics.update(
            experts_kept={str(b.layer): k for b, k in zip(blocks, keeps, strict=True)},
            experts_before=[len(s.counts) for s in stats],
            statistics=[s.summary(cfg.min_tokens) for s in stats],
            flagged_experts=sum(len(s.flagged(cfg.min_tokens)) for s in stats),
        )
        return ctx


def _report_risk(estimate: dict[str, Any], cfg: PruneExpertsConfig, progress: Progress) -> None:
    line = (f"pre-check: tolerated sparsity ≈ {estimate['tolerated_sparsity']:g} (probe KL ≤ "
            f"{cfg.precheck.max_kl:g}); requested {cfg.sparsity:g}, probe KL "
            f"{estimate['kl_by_sparsity'][f'{cfg.sparsity:g}']:.4f}")  # fmt: skip
    if not estimate["risk"]:
        progress.log(f"[dim]{line}[/dim]")
        return
    if cfg.precheck.on_risk == "fail":
        raise KnowpressError(
            f"{line}: the requested sparsity exceeds what this model tolerates; lower "
            "sparsity, or set precheck.on_risk: warn to prune anyway"
        )
    progress.log(f"[yellow]warning: {line}: above the tolerated sparsity[/yellow]")
