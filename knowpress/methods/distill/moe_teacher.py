"""MoE teachers (Every Expert Matters, Kim et al. 2025, arXiv:2502.12947).

- **Knowledge augmentation** (``augment: K``): the teacher is run ``K`` times per batch with
  its routing *sampled* instead of top-k — each token draws ``top_k`` experts without
  replacement from the router's softmax, their weights renormalised as the model does
  (``norm_topk_prob`` where the architecture has it) — and the student is distilled against
  each: ``loss = (1/K) Σ_k D(p_k ‖ q)``. Experts a top-k teacher never consults for a token
  still speak, so their knowledge reaches the student.
- **Student-aware router** (``router_lr > 0``): the teacher's routers (only) are trained by
  the same KD loss, through a second AdamW, so the teacher learns to route towards what the
  student can follow; experts, attention and embeddings stay frozen. The stage trains a copy
  of the teacher; the recipe's teacher is not changed.

Routers are the transformers 5 ``*TopKRouter`` modules (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE): ``forward(h) -> (router_logits, top_k_weights, top_k_index)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field
from torch import nn

from knowpress.core.config import FrozenConfig


class MoETeacherSpec(FrozenConfig):
    augment: int = Field(1, ge=1, le=16, description="K routings sampled per batch (1: top-k)")
    router_lr: float = Field(0.0, ge=0, description="> 0: train the teacher's routers (only)")


def routers(model: nn.Module) -> list[nn.Module]:
    """The top-k router modules of a transformers 5 sparse-MoE model (empty for dense)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _sampled(module: nn.Module, generator: torch.Generator) -> Any:
    def hook(_m: nn.Module, _args: Any, output: tuple[torch.Tensor, ...]) -> Any:
        logits, weights, _ = output
        probs = torch.softmax(logits.float(), dim=-1)
        index = torch.multinomial(probs, module.top_k, replacement=False, generator=generator)
        chosen = probs.gather(-1, index)
        if getattr(module, "norm_topk_prob", True):
            chosen = chosen / chosen.sum(-1, keepdim=True)
        return logits, chosen.to(weights.dtype), index

    return module.register_forward_hook(hook)


@contextmanager
def sampled_routing(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside, every router of ``model`` samples its experts (seeded); top-k again after."""
    found = routers(model)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    hooks = [_sampled(m, generator) for m in found]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in routers(model) for p in m.parameters()]


def check_moe_teacher(spec: MoETeacherSpec, teacher_config: Any) -> str | None:
    experts = getattr(teacher_config, "num_local_experts", None) or getattr(
        teacher_config, "num_experts", None
    )
    if (spec.augment > 1 or spec.router_lr > 0) and not experts:
        return "moe_teacher: the teacher is dense (no experts to sample or route)"
    return None
