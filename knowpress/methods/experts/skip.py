"""Dynamic expert skipping at inference: a runtime policy on the routers (MC-MoE's ODP,
Huang et al. 2024, "MC-MoE: Mixture Compressor for Mixture-of-Experts LLMs Gains More",
arXiv:2410.06270).

For a token with chosen experts ``j₁..j_k`` and combine weights ``g``, expert ``j`` is
skipped when ``g_j < β · max_i g_i`` (the top expert is never skipped). A skipped slot's
index becomes the sentinel ``E`` and its weight 0; transformers' eager expert loop skips
sentinel slots (their FLOPs are really saved), while its grouped and batched kernels honour
them only under expert parallelism (elsewhere they leave those rows uninitialised: NaN), so
``attach`` switches the model to the eager experts implementation and ``detach`` restores
it. With ``renormalize`` the kept weights are rescaled to the sum the router gave (the
layer's output keeps its scale). The policy is saved in the manifest
(``runtime.expert_skip``) and attached by the loader, so evaluation scores the model as it
will run; ``SkipCounter`` counts the expert slots computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from knowpress.arch.moe import moe_blocks
from knowpress.core.config import FrozenConfig

HOOKS = "_knowpress_skip_hooks"
RESTORE = "_knowpress_skip_experts_implementation"  # what attach switched away from


@dataclass
class SkipCounter:
    """Token-expert slots routed (``slots``) and computed (``active``) since attaching."""

    tokens: int = 0
    slots: int = 0
    active: int = 0

    @property
    def active_share(self) -> float:
        return self.active / max(1, self.slots)


def skip_slots(index: torch.Tensor, weight: torch.Tensor, beta: float, sentinel: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(index, weight)`` ``[N, k]`` with the slots below ``β·max`` skipped."""
    top = weight.max(dim=-1, keepdim=True).values
    skip = weight < beta * top
    kept = weight.masked_fill(skip, 0.0)
    if renormalize:
        kept = kept * (weight.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-20))
    return index.masked_fill(skip, sentinel), kept


class ExpertSkip(FrozenConfig):
    name: Literal["odp"] = "odp"
    beta: float = Field(0.3, gt=0, le=1, description="skip g_j < beta * top weight")
    renormalize: bool = True

    def attach(self, model: nn.Module) -> SkipCounter:
        """Hook every router of ``model`` (replacing hooks an earlier attach left)."""
        detach(model)
        counter = SkipCounter()
        handles = []
        before = getattr(model.config, "_experts_implementation", None)
        if before not in (None, "eager"):
            model.set_experts_implementation("eager")
            setattr(model, RESTORE, before)
        for block in moe_blocks(model):
            sentinel = block.num_experts

            def hook(_m: nn.Module, _args: Any, output: tuple[torch.Tensor, ...],
                     sentinel: int = sentinel) -> tuple[torch.Tensor, ...]:  # fmt: skip
                logits, weight, index = output
                new_index, new_weight = skip_slots(index, weight, self.beta, sentinel,
                                                   self.renormalize)  # fmt: skip
                counter.tokens += index.shape[0]
                counter.slots += index.numel()
                counter.active += int((new_index != sentinel).sum())
                return logits, new_weight.to(weight.dtype), new_index

            handles.append(block.router.register_forward_hook(hook))
        setattr(model, HOOKS, handles)
        return counter


def detach(model: nn.Module) -> None:
    """Remove the skipping hooks ``attach`` put on ``model`` (none: nothing happens)."""
    for handle in getattr(model, HOOKS, []):
        handle.remove()
    if hasattr(model, HOOKS):
        delattr(model, HOOKS)
    if hasattr(model, RESTORE):
        model.set_experts_implementation(getattr(model, RESTORE))
        delattr(model, RESTORE)
