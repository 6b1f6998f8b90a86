"""Per-linear sensitivity scores at each candidate width, from one block-wise calibration pass.

For a linear target ``t`` with weight ``W``, inputs ``x_n`` and output ``y_n = W x_n`` at the
calibration tokens ``n``, and ``ΔW_b = Q_b(W) − W`` (round-to-nearest on the stage's grid,
group size and symmetry at ``b`` bits), the output error is ``Δy_{n,b} = ΔW_b x_n`` and:

- ``output``: ``s_{t,b} = Σ_n ‖Δy_{n,b}‖² = tr(ΔW_b H ΔW_bᵀ)``, ``H = Σ_n x_n x_nᵀ`` (the
  Hessian GPTQ uses); a forward pass only, but not on one scale across depth (the residual
  stream grows);
- ``fisher`` (ModelOpt AutoQuantize's gradient score): ``s_{t,b} = Σ_n Σ_o g_{n,o}² Δy_{n,o,b}²``
  with ``g = ∂L/∂y`` the gradient of the next-token cross-entropy ``L`` of the calibration
  text at the unquantized model — the second-order Taylor term ``½ Δyᵀ F Δy`` of the loss
  change (times 2) with the Fisher diagonal for the Hessian, so every score is in units of
  loss and one global budget compares them.

Block-wise (``arch/sequential.py``): the forward pass keeps each block's inputs; the backward
pass then onloads one block at a time from the last, recomputes it on its kept inputs and
back-propagates ``∂L/∂h`` from the block above (block-wise activation checkpointing), the
scores accumulated by hooks on the block's targets. No whole-model float copy, no weight
gradient. Linears that receive the same input tensor (q/k/v, gate/up) are reported together
(``ties``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from knowpress.arch.layers import LayerInput, decoder_layers
from knowpress.arch.sequential import (
    Onload,
    Onloaded,
    blocks,
    final_norm,
    home_device,
)
from knowpress.core.measure import release_memory
from knowpress.methods.quant.plan import Assignment


class _Scorer:
    """Hooks one linear: every forward adds ``Σ (g ⊙ Δy_b)²`` (``g`` = 1 without ``fisher``)
    per candidate, the gradient arriving through a hook on the output tensor."""

    def __init__(self, module: nn.Module, deltas: list[torch.Tensor], fisher: bool) -> None:
        self.deltas, self.fisher = deltas, fisher
        self.sums = torch.zeros(len(deltas), dtype=torch.float64)
        self.first: torch.Tensor | None = None  # the first input, to find shared inputs
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0]
        if self.first is None:
            self.first = x
        if not self.fisher:
            self.add(x, None)
        elif output.requires_grad:
            output.register_hook(lambda g: self.add(x, g))

    @torch.no_grad()
    def add(self, x: torch.Tensor, g: torch.Tensor | None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        weight = None if g is None else g.detach().reshape(rows.shape[0], -1).float().pow(2)
        for c, delta in enumerate(self.deltas):
            dy = (rows @ delta.T).pow(2)
            self.sums[c] += float(dy.sum() if weight is None else (dy * weight).sum())

    def close(self) -> None:
        self.handle.remove()
        self.deltas = []


def _deltas(module: nn.Module, assignment: Assignment, candidates: Sequence[int],
            device: torch.device) -> list[torch.Tensor]:  # fmt: skip
    """``Q_b(W) − W`` (float32, on ``device``) for each candidate width."""
    from knowpress.methods.quant.base import as_linear
    from knowpress.tensors.grids import Grid, dequantize

    method: Any = assignment.method
    weight = as_linear(module).weight.detach().float().to(device)
    out = []
    for bits in candidates:
        q = method.quantize_weight(weight, bits)
        grid = Grid(method.dtype, bits, method.symmetric, None, q.global_scale)
        approx = dequantize(q.codes, q.scales, q.zeros, grid, method.group(weight.shape[1]))
        out.append(approx.to(device) - weight)
    return out


def _install(model: nn.Module, chosen: Sequence[Assignment], candidates: Sequence[int],
             fisher: bool, device: torch.device) -> dict[str, _Scorer]:  # fmt: skip
    out = {}
    for a in chosen:
        module = model.get_submodule(a.target.module)
        out[a.target.name] = _Scorer(module, _deltas(module, a, candidates, device), fisher)
    return out


def _finish(scorers: dict[str, _Scorer], scores: dict[str, list[float]],
            ties: list[list[str]]) -> None:  # fmt: skip
    """Each scorer's sums into ``scores``; targets that saw one input tensor into one tie."""
    groups: list[tuple[torch.Tensor | None, list[str]]] = []
    for name, scorer in scorers.items():
        scorer.close()
        scores[name] = scorer.sums.tolist()
        same = next((g for x, g in groups if x is not None and x is scorer.first), None)
        if same is None:
            groups.append((scorer.first, [name]))
        else:
            same.append(name)
        scorer.first = None
    ties += [names for _, names in groups]


def _fresh(item: Any, device: torch.device) -> Any:
    """A normal (not inference-mode) copy of the tensors in ``item`` on ``device``."""
    if isinstance(item, torch.Tensor):
        return item.detach().to(device).clone()
    if isinstance(item, tuple):
        return tuple(_fresh(x, device) for x in item)
    if isinstance(item, dict):
        return {k: _fresh(v, device) for k, v in item.items()}
    return item


def by_block(model: nn.Module, planned: Sequence[Assignment]) -> tuple[dict[int, list[Assignment]],
                                                                     list[Assignment]]:  # fmt: skip
    """The planned linears by decoder block index, and those outside every block."""
    prefix, _ = decoder_layers(model)
    inside: dict[int, list[Assignment]] = {}
    outside = []
    for a in planned:
        head = a.target.module.removeprefix(prefix + ".").split(".", 1)[0]
        if a.target.module.startswith(prefix + ".") and head.isdigit():
            inside.setdefault(int(head), []).append(a)
        else:
            outside.append(a)
    return inside, outside


def measure(
    model: nn.Module, planned: Sequence[Assignment], batches: Sequence[torch.Tensor],
    onload: Onload, candidates: Sequence[int], fisher: bool,
) -> tuple[dict[str, list[float]], list[list[str]]]:  # fmt: skip
    """``{target name: [s_{t,b} per candidate]}`` and the ties (module docstring); targets
    outside the blocks may only be the output head (scored in the tail pass)."""
    inside, outside = by_block(model, planned)
    scores: dict[str, list[float]] = {}
    ties: list[list[str]] = []
    kept: list[list[LayerInput]] = []
    final: list[LayerInput] = []
    keep = torch.device("cpu") if onload.offload_activations else onload.device
    for step in blocks(model, batches, onload, final):
        if fisher:  # the inputs the backward pass recomputes the block from
            kept.append([LayerInput(x.hidden.to(keep), x.kwargs) for x in step.inputs])
        elif step.index in inside:
            scorers = _install(model, inside[step.index], candidates, False, onload.device)
            step.run()
            _finish(scorers, scores, ties)
    if fisher or outside:  # the output score needs the tail only for a planned head
        grads = _tail(model, final, batches, onload, outside, candidates, fisher, (scores, ties))
    if fisher:
        _backward(model, kept, grads, onload, inside, candidates, (scores, ties))
    return scores, ties


def _tail(
    model: nn.Module, final: list[LayerInput], batches: Sequence[torch.Tensor], onload: Onload,
    outside: Sequence[Assignment], candidates: Sequence[int], fisher: bool,
    into: tuple[dict[str, list[float]], list[list[str]]],
) -> list[torch.Tensor]:  # fmt: skip
    """The final norm and head on the last block's outputs: ``∂L/∂h`` per batch (mean
    next-token cross-entropy of each batch), the head scored when it is planned."""
    norm, head = final_norm(model), model.get_output_embeddings()
    assert norm is not None and head is not None
    moved = Onloaded([norm, head], onload.device, onload.dtype, home_device(model), model)
    grads = []
    try:
        scorers = _install(model, outside, candidates, fisher, onload.device)
        for item, ids in zip(final, batches, strict=True):
            with torch.enable_grad():
                hidden = _fresh(item.hidden, onload.device).requires_grad_(True)
                logits = head(norm(hidden)).float()
                labels = ids[:, 1:].reshape(-1).to(onload.device)
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   labels)  # fmt: skip
                if fisher:
                    grads.append(torch.autograd.grad(loss, hidden)[0].detach())
        _finish(scorers, *into)
    finally:
        moved.restore()
    return grads


def _backward(
    model: nn.Module, kept: list[list[LayerInput]], grads: list[torch.Tensor], onload: Onload,
    inside: dict[int, list[Assignment]], candidates: Sequence[int],
    into: tuple[dict[str, list[float]], list[list[str]]],
) -> None:  # fmt: skip
    """From the last block down: recompute each block on its kept inputs and carry ``∂L/∂h``
    through it, its planned linears scored on the way (module docstring)."""
    _, layers = decoder_layers(model)
    device, home = onload.device, home_device(model)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        moved = Onloaded([layer], device, onload.dtype, home, model)
        try:
            scorers = _install(model, inside.get(index, []), candidates, True, device)
            below = []
            for item, grad in zip(kept[index], grads, strict=True):
                with torch.enable_grad():
                    x = _fresh(item.hidden, device).requires_grad_(True)
                    out = layer(x, use_cache=False, **_fresh(item.kwargs, device))
                    hidden = out[0] if isinstance(out, tuple) else out
                    (dx,) = torch.autograd.grad(hidden, x, grad.to(device, hidden.dtype))
                below.append(dx.detach().to(grad.device))
            grads = below
            _finish(scorers, *into)
            kept[index] = []  # this block's inputs are no longer needed
        finally:
            moved.restore()
            release_memory()
