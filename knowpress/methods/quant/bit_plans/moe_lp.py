"""Per-expert mixed precision by integer programming (MC-MoE's PMQ, Huang et al. 2024,
"MC-MoE: Mixture Compressor for Mixture-of-Experts LLMs Gains More", arXiv:2410.06270).

For every routed expert ``i`` (all MoE blocks together) and candidate width ``b``:
``L_{i,b}`` = mean over the calibration tokens routed to ``i`` of ``‖f_i^b(x) − f_i(x)‖²``,
with ``f_i^b`` the expert with its ``gate_up_proj`` and ``down_proj`` rounded (RTN, the
quantize stage's group size and symmetry) to ``b`` bits and nothing else changed;
importance ``w_i`` = routing weight ``Σ_x g_i(x) / N`` (selection frequency times mean
combine weight, ``stats.py``). Then, with ``x_{i,b} ∈ {0, 1}`` and ``n_i`` the expert's
parameter count::

    min Σ w_i · L_{i,b} · x_{i,b}
    s.t. Σ_b x_{i,b} = 1 for every i,   Σ b · n_i · x_{i,b} ≤ avg_bits · Σ n_i

solved by ``scipy.optimize.milp`` (HiGHS). ``budget: per_layer`` (the default, as MC-MoE
allocates) holds the bits constraint within every MoE block: output errors of different
blocks are not on one scale (the residual stream grows with depth), and one program over
all blocks moved bits to the deepest ones. ``global`` is the single constraint above. The
chosen widths become each fused tensor's ``expert_bits`` in the quantize stage
(``tensors/qexperts.py`` stores them). The program is the shared one (``base.solve``) with
sizes in bit-parameters ``b · n_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from knowpress.arch.moe import MoEBlock, expert_mlp, moe_blocks
from knowpress.arch.sequential import Onload, moe_inputs
from knowpress.core.errors import KnowpressError
from knowpress.methods.quant.base import QuantMethod
from knowpress.methods.quant.bit_plans import base
from knowpress.methods.quant.bit_plans.base import BIT_PLANS, BitPlan
from knowpress.methods.quant.plan import Assignment


@BIT_PLANS.register("moe_lp")
class MoELPSpec(BitPlan):
    summary = "bits per routed expert by integer programming over error x routing weight"
    paper = "Huang et al. 2024 (MC-MoE, PMQ), arXiv:2410.06270"

    name: Literal["moe_lp"]
    avg_bits: float = Field(gt=0, description="mean bits over the routed experts' weights")
    budget: Literal["per_layer", "global"] = "per_layer"

    def check(self, assignments: Sequence[Assignment], method: QuantMethod,
              model: nn.Module) -> None:  # fmt: skip
        if not any(a.target.kind == "fused_experts" for a in assignments):
            raise KnowpressError(
                "quantize.bits_plan: moe_lp assigns bits to fused MoE experts, and the "
                "targets hold none (an MoE model, with its experts targeted, is needed)"
            )
        if not hasattr(method, "expert_bits"):
            raise KnowpressError(f"quantize.bits_plan: {method.name} has no bits per expert")
        super().check(assignments, method, model)
        _check_whole_experts(assignments)

    def storage_view(self, assignments: list[Assignment]) -> list[Assignment]:
        """The fused targets with a width per expert (the method's until the plan chooses)."""
        widths = {a.target.name: [getattr(a.method, "bits", 4)] * a.target.shape[0]
                  for a in assignments if a.target.kind == "fused_experts"}  # fmt: skip
        return base.with_widths(assignments, widths)

    def lines(self, model: nn.Module, assignments: list[Assignment], storage: str,
              predicted: int) -> list[str]:  # fmt: skip
        return [
            f"bits_plan: moe_lp, {self.avg_bits:g} bits per routed expert on average, "
            "chosen on calibration data (the prediction above is at the method's bits)"
        ]

    def plan(
        self, model: nn.Module, assignments: list[Assignment], batches: list[torch.Tensor],
        onload: Onload, storage: str,
    ) -> tuple[list[Assignment], dict[str, Any]]:  # fmt: skip
        """moe_lp's bits per expert on every fused tensor (both tensors of an experts module
        share its experts' widths)."""
        fused = [a for a in assignments if a.target.kind == "fused_experts"]
        groups: dict[str, dict[str, int]] = {}
        for a in fused:
            groups.setdefault(a.target.module, {})[a.target.attribute] = (
                getattr(a.method, "group_size", None) or a.target.shape[-1])  # fmt: skip
        pairs = {m: (g.get("gate_up_proj", 0), g.get("down_proj", 0)) for m, g in groups.items()}
        result = plan_expert_bits(self, model, batches, pairs,
                                  bool(getattr(fused[0].method, "symmetric", True)),
                                  onload)  # fmt: skip
        widths = {a.target.name: result["expert_bits"][a.target.module] for a in fused}
        return base.with_widths(assignments, widths), result


def _check_whole_experts(assignments: Sequence[Assignment]) -> None:
    """moe_lp sets one width per expert for both its tensors: both must be targeted."""
    fused: dict[str, set[str]] = {}
    for a in assignments:
        if a.target.kind == "fused_experts":
            fused.setdefault(a.target.module, set()).add(a.target.attribute)
    for module, names in fused.items():
        if names != {"gate_up_proj", "down_proj"}:
            raise KnowpressError(
                f"quantize.bits_plan: moe_lp sets each expert's width for its gate_up_proj and "
                f"down_proj, and {module} has only {sorted(names)} targeted; target both"
            )


def _rounded(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    from knowpress.tensors.packing import dequantize_groups, quantize_groups

    q = quantize_groups(weight, bits, group, symmetric)
    return dequantize_groups(q.codes, q.scales, q.zeros, bits, group)


@torch.no_grad()
def expert_errors(
    block: MoEBlock, x: torch.Tensor, candidates: list[int], groups: tuple[int, int],
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``L [E, C]`` (module docstring) and importance ``[E]`` for one block's inputs ``x``."""
    from knowpress.tensors.qexperts import current_weight

    routing = block.route(x)
    gate_up_all = current_weight(block.experts, "gate_up_proj").float()
    down_all = current_weight(block.experts, "down_proj").float()
    errors = torch.zeros(block.num_experts, len(candidates), dtype=torch.float64)
    importance = torch.zeros(block.num_experts, dtype=torch.float64)
    for j in range(block.num_experts):
        rows, slot = torch.where(routing.index == j)
        importance[j] = float(routing.weight[rows, slot].sum()) / max(1, x.shape[0])
        if rows.numel() == 0:
            continue
        xj = x[rows]
        exact = expert_mlp(block.experts, gate_up_all[j], down_all[j], xj)
        for c, bits in enumerate(candidates):
            gate_up = _rounded(gate_up_all[j], bits, groups[0], symmetric)
            down = _rounded(down_all[j], bits, groups[1], symmetric)
            approx = expert_mlp(block.experts, gate_up, down, xj)
            errors[j, c] = float((approx - exact).pow(2).sum(-1).mean())
    return errors, importance


def solve(costs: torch.Tensor, sizes: list[int], candidates: list[int], avg_bits: float,
          groups: list[int] | None = None) -> list[int]:  # fmt: skip
    """The MILP (module docstring): ``costs [n, C]`` = w_i·L_{i,b}; ``sizes`` each expert's
    parameters; ``groups``: each expert's budget group (its block; None: one group); the
    chosen bits per expert (``base.solve`` with sizes ``b · n_i``)."""
    labels = groups or [0] * len(sizes)
    bit_params = torch.tensor([[float(b * s) for b in candidates] for s in sizes])
    budgets = [avg_bits * float(sum(s for s, k in zip(sizes, labels, strict=True) if k == g))
               for g in sorted(set(labels))]  # fmt: skip
    return base.solve(costs, bit_params, candidates, budgets, labels)


def plan_expert_bits(
    spec: MoELPSpec, model: nn.Module, batches: list[torch.Tensor],
    groups: dict[str, tuple[int, int]], symmetric: bool, onload: Onload | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``{experts module name: [bits per expert]}`` for every MoE block of ``model`` plus the
    figures the stage reports (``groups``: that module's gate_up / down group sizes); the
    blocks' inputs come from one block-wise pass (``arch/sequential.py``)."""
    onload = onload or Onload(next(model.parameters()).device)

    blocks = moe_blocks(model)
    missing = [f"{b.name}.experts" for b in blocks if f"{b.name}.experts" not in groups]
    if missing:
        raise KnowpressError(
            f"bits_plan moe_lp: {missing[0]} is not among the quantize targets; target the "
            "fused expert tensors (the default targets do)"
        )
    costs, sizes, owners = [], [], []
    for _, block, inputs, _step in moe_inputs(model, batches, onload):
        name = f"{block.name}.experts"
        x = torch.cat(inputs)
        errors, importance = expert_errors(block, x, list(spec.candidates), groups[name],
                                           symmetric)  # fmt: skip
        costs.append(errors * importance[:, None])
        per_expert = block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()
        sizes += [per_expert // block.num_experts] * block.num_experts
        owners += [name] * block.num_experts
    layer_of = [i for i, b in enumerate(blocks) for _ in range(b.num_experts)]
    chosen = solve(torch.cat(costs), sizes, list(spec.candidates), spec.avg_bits,
                   layer_of if spec.budget == "per_layer" else None)  # fmt: skip
    plan: dict[str, list[int]] = {}
    for name, bits in zip(owners, chosen, strict=True):
        plan.setdefault(name, []).append(bits)
    achieved = sum(b * s for b, s in zip(chosen, sizes, strict=True)) / sum(sizes)
    return {"expert_bits": plan, "avg_bits": round(achieved, 4)}
