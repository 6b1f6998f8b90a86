"""Router re-calibration: refit each compressed MoE block's router so the compressed model
selects the experts the original selected (QESC of EAC-MoE, "Expert-Selection Aware
Compressor for Mixture-of-Experts LLMs", 2025; used there after quantization, it serves
pruning as well).

Block by block, in order (a refit changes every later block's inputs): ``X [N, H]`` are the
compressed model's inputs to the block on the calibration tokens, ``Z [N, E']`` the original
router's logits on the original's own inputs for the same tokens, restricted to the kept
experts (``kept`` maps the compressed block's experts to the original's ids). The new router
weight is the ridge solution pulled toward the current one::

    W = argmin ‖X Wᵀ − Z̄‖² + λ‖W − W₀‖²,   (XᵀX + λI) Wᵀ = XᵀZ̄ + λW₀ᵀ,   λ = damp·mean diag(XᵀX)

with ``Z̄`` = Z centred per token for softmax routers (softmax ignores a per-token shift;
sigmoid routers are fitted on Z as is). Selection agreement = mean over tokens of
``|topk(X Wᵀ) ∩ topk(Z)| / k``, reported before and after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from knowpress.arch.moe import MoEBlock, moe_blocks
from knowpress.arch.sequential import Onload, moe_inputs
from knowpress.core.errors import KnowpressError


def _logits(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    return x @ block.router.weight.float().T


def agreement(block: MoEBlock, x: torch.Tensor, target: torch.Tensor) -> float:
    """Mean top-k overlap between the block's routing of ``x`` and ``target`` logits (with
    the block's selection-only correction bias added to both, as its router does)."""
    k = block.top_k
    bias = getattr(block.router, "e_score_correction_bias", None)
    ours, theirs = _logits(block, x), target
    if bias is not None:
        ours, theirs = ours.sigmoid() + bias.float(), theirs.sigmoid() + bias.float()
    a, b = ours.topk(k, dim=-1).indices, theirs.topk(k, dim=-1).indices
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)
    return float((hits / k).mean())


@torch.no_grad()
def fit_router(block: MoEBlock, x: torch.Tensor, target: torch.Tensor, damp: float) -> None:
    """Replace the router weight by the ridge solution (module docstring)."""
    z = target - target.mean(-1, keepdim=True) if block.arch.scoring == "softmax" else target
    w0 = block.router.weight.detach().float()
    gram = x.T @ x
    lam = damp * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + lam * eye, x.T @ z + lam * w0.T)  # [H, E']
    block.router.weight.data.copy_(solution.T.to(block.router.weight.dtype))


def router_logits(model: nn.Module, batches: list[torch.Tensor],
                  onload: Onload) -> list[torch.Tensor]:  # fmt: skip
    """``[N, E]`` router logits of every MoE block on its own inputs, in one block-wise pass
    (on the CPU: small beside the inputs)."""
    return [_logits(block, torch.cat(x)).cpu() for _, block, x, _ in
            moe_inputs(model, batches, onload)]  # fmt: skip


def recalibrate(model: nn.Module, original: nn.Module, batches: list[torch.Tensor],
                kept: list[list[int]], damp: float,
                onload: Onload | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Refit every block's router in order, one decoder block onloaded at a time
    (``arch/sequential.py``): block ``i`` is fitted on its inputs after the refits before it.
    Per block the agreement before and after."""
    onload = onload or Onload(next(model.parameters()).device)
    count, sources = len(moe_blocks(model)), len(moe_blocks(original))
    if count != sources:
        raise KnowpressError(
            f"recalibrate_routers: the model has {count} MoE blocks, the original "
            f"(teacher) {sources}; the teacher must be the model before compression"
        )
    targets = router_logits(original, batches, onload)  # the original does not change
    report = []
    for i, block, inputs, step in moe_inputs(model, batches, onload):
        x, target = torch.cat(inputs), targets[i][:, kept[i]].to(onload.device)
        before = agreement(block, x, target)
        fit_router(block, x, target, damp)
        step.changed = True  # the next blocks see this router's choices
        report.append({"layer": block.layer, "agreement_before": round(before, 5),
                       "agreement_after": round(agreement(block, x, target), 5)})  # fmt: skip
    return report


def kept_ids(history: list[Any], original_counts: list[int]) -> list[list[int]]:
    """Original expert ids of each block's experts, composed over the run's earlier
    ``prune_experts`` stages (their ``details.experts_kept``); identity without one."""
    kept = [list(range(n)) for n in original_counts]
    for record in history:
        if record.kind != "prune_experts":
            continue
        step = record.details["experts_kept"]
        kept = [[kept[i][j] for j in step[str(layer)]] for i, layer in
                enumerate(sorted(int(k) for k in step))]  # fmt: skip
    return kept
