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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from knowpress.arch.moe import MoEBlock, moe_blocks
from knowpress.core.errors import KnowpressError

Turn = Callable[[torch.Tensor], torch.Tensor]  # what a capture keeps of a block's inputs


@torch.no_grad()
def _capture(model: nn.Module, batches: list[torch.Tensor],
             pick: dict[int, Turn]) -> dict[int, torch.Tensor]:  # fmt: skip
    """One pass over ``batches``: for each MoE block index in ``pick``, its float inputs
    ``[N, H]`` turned by ``pick[i]`` and concatenated over the batches."""
    blocks = moe_blocks(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in pick}
    handles = []
    for i, turn in pick.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i,
                 turn: Turn = turn) -> None:  # fmt: skip
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i].append(turn(hidden.detach().reshape(-1, hidden.shape[-1]).float()))

        handles.append(blocks[i].block.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(parts) for i, parts in seen.items()}


def block_inputs(model: nn.Module, batches: list[torch.Tensor], index: int) -> torch.Tensor:
    """``[N, H]`` float inputs of MoE block ``index`` over ``batches``."""
    return _capture(model, batches, {index: lambda x: x})[index]


def router_logits(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[N, E]`` router logits of every MoE block, in one pass (small beside the inputs)."""
    blocks = moe_blocks(model)
    pick = {i: (lambda x, b=b: _logits(b, x)) for i, b in enumerate(blocks)}
    found = _capture(model, batches, pick)  # type: ignore[arg-type]
    return [found[i] for i in range(len(blocks))]


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


def recalibrate(model: nn.Module, original: nn.Module, batches: list[torch.Tensor],
                kept: list[list[int]], damp: float) -> list[dict[str, Any]]:  # fmt: skip
    """Refit every block's router in order; per block the agreement before and after."""
    blocks, sources = moe_blocks(model), moe_blocks(original)
    if len(blocks) != len(sources):
        raise KnowpressError(
            f"recalibrate_routers: the model has {len(blocks)} MoE blocks, the original "
            f"(teacher) {len(sources)}; the teacher must be the model before compression"
        )
    targets = router_logits(original, batches)  # the original does not change: one pass
    report = []
    for i, block in enumerate(blocks):
        target = targets[i][:, kept[i]]
        x = block_inputs(model, batches, i)  # after the refits before it: one pass each
        before = agreement(block, x, target)
        fit_router(block, x, target, damp)
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
