"""``kind: recalibrate_routers`` — refit each MoE router of a pruned or quantized model so it
selects what the original (the run's teacher, by default the input model) selected.

```yaml
- kind: prune_experts
  sparsity: 0.5
- kind: quantize
  method: {name: gptq, bits: 3}
- kind: recalibrate_routers     # after the stages that changed the experts
  damp: 0.01
```

Calibration: ``data.calibration``. Details: expert-selection agreement (top-k overlap with
the original's choice among the kept experts) per layer, before and after
(``methods/experts/router_fit.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from knowpress.arch.moe import moe_blocks
from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig


@STAGES.register("recalibrate_routers")
class RecalibrateRoutersConfig(StageConfig):
    summary = "refit MoE routers to select the experts the original selected (QESC)"
    paper = "EAC-MoE (QESC), 2025"

    kind: Literal["recalibrate_routers"]
    damp: float = Field(0.01, gt=0, description="ridge pull toward the current router")
    needs_teacher = True
    blockwise = True

    def build(self) -> RecalibrateRouters:
        return RecalibrateRouters(self)

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        blocks = moe_blocks(model)
        return [f"refit {len(blocks)} routers against the teacher's expert selection"]


class RecalibrateRouters:
    def __init__(self, config: RecalibrateRoutersConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.methods.experts.router_fit import kept_ids, recalibrate
        from knowpress.pipeline.blockwise import onload_for
        from knowpress.pipeline.calibration import calibration_batches

        if ctx.teacher is None:
            raise KnowpressError("recalibrate_routers: no teacher (the original) was loaded")
        positions = int(getattr(ctx.model.config, "max_position_embeddings", 2048))
        sequences = ctx.calibration_ids(positions)
        counts = [b.num_experts for b in moe_blocks(ctx.teacher)]
        kept = kept_ids(ctx.history, counts)
        now = [b.num_experts for b in moe_blocks(ctx.model)]
        if [len(k) for k in kept] != now:
            raise KnowpressError(
                f"recalibrate_routers: the model's expert counts {now} do not follow from the "
                f"teacher's {counts} and this run's prune_experts stages; the teacher must be "
                "the model before compression"
            )
        progress.log(f"[dim]recalibrate_routers: {len(now)} routers[/dim]")
        layers = recalibrate(ctx.model, ctx.teacher, calibration_batches(sequences), kept,
                             self.config.damp, onload_for(ctx))  # fmt: skip
        ctx.metrics.update(
            routers=layers,
            agreement_before=round(sum(r["agreement_before"] for r in layers) / len(layers), 5),
            agreement_after=round(sum(r["agreement_after"] for r in layers) / len(layers), 5),
        )
        return ctx
