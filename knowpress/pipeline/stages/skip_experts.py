"""``kind: skip_experts`` — attach dynamic expert skipping (ODP) as a runtime policy.

```yaml
- kind: skip_experts
  policy: {name: odp, beta: 0.3}   # skip a chosen expert whose weight < 0.3 x the top one
```

The weights are unchanged; the policy goes into the manifest (``runtime.expert_skip``), and
evaluation, generation and later stages' artifacts carry it (``methods/experts/skip.py``).
Details: on ``data.calibration``, experts computed per token against the top-k routed, and
the active expert parameters per token.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from knowpress.arch.moe import moe_blocks
from knowpress.core.progress import Progress
from knowpress.methods.experts.skip import ExpertSkip, detach
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig


@STAGES.register("skip_experts")
class SkipExpertsConfig(StageConfig):
    summary = "skip a token's low-weight experts at inference (ODP runtime policy)"
    paper = "Huang et al. 2024 (MC-MoE), arXiv:2410.06270"

    kind: Literal["skip_experts"]
    policy: ExpertSkip = ExpertSkip()

    def build(self) -> SkipExperts:
        return SkipExperts(self)

    def attaches(self) -> dict[str, Any]:
        return {"expert_skip": self.policy}

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        blocks = moe_blocks(model)
        return [f"{self.policy.name}: skip experts below {self.policy.beta:g} x the top weight "
                f"in {len(blocks)} blocks"]  # fmt: skip


class SkipExperts:
    def __init__(self, config: SkipExpertsConfig) -> None:
        self.config = config

    @torch.no_grad()
    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.pipeline.calibration import calibration_batches

        model, policy = ctx.model, self.config.policy
        positions = int(getattr(model.config, "max_position_embeddings", 2048))
        sequences = ctx.calibration_ids(positions)
        counter = policy.attach(model)
        try:
            for ids in calibration_batches(sequences):
                model(input_ids=ids.to(ctx.device), use_cache=False)
        finally:
            detach(model)
        blocks = moe_blocks(model)
        per_expert = sum((b.experts.gate_up_proj.numel() + b.experts.down_proj.numel())
                         / b.num_experts for b in blocks)  # fmt: skip
        routed = blocks[0].top_k
        active = counter.active_share * routed
        ctx.expert_skip = policy
        ctx.metrics.update(
            routed_experts_per_token=routed,
            active_experts_per_token=round(active, 4),
            active_expert_share=round(counter.active_share, 4),
            active_expert_parameters_per_token=round(active * per_expert),
            routed_expert_parameters_per_token=round(routed * per_expert),
        )
        progress.log(f"[dim]skip_experts: {active:.2f} of {routed} experts per token[/dim]")
        return ctx
