"""Sensitivity bit plans: each linear's width chosen by the loss change each width causes, at an
exact byte budget (ModelOpt AutoQuantize, NVIDIA TensorRT Model Optimizer; the search it
describes as a knapsack over per-layer formats, with gradient sensitivity scores).

For every planned linear ``t`` and candidate width ``b``: the score ``s_{t,b}`` of
``scores.py`` (``fisher``, the default: ``Σ_n Σ_o (∂L/∂y_{n,o})² (ΔW_b x_n)_o²``, the
second-order Taylor term of the calibration loss with the Fisher diagonal, AutoQuantize's; or
``output``: ``tr(ΔW_b H ΔW_bᵀ)``), and ``B_{t,b}`` the bytes the target stores at that width in
the stage's folder format (codes + scales + zero points, ``base.payload_bytes``). Linears that
read one input tensor (q/k/v, gate/up: ``tie_inputs``) share one width, as serving engines fuse
them into one matmul with one scheme (vLLM refuses mixed schemes in a fused layer; AutoQuantize
groups them the same way). Then ``base.solve`` with costs ``Σ_{t∈i} s_{t,b}``, sizes
``Σ_{t∈i} B_{t,b}`` and one budget: the bytes every planned linear would take at ``avg_bits``
(``base.byte_budget``: exactly uniform storage when ``avg_bits`` is a candidate, linear
between the two candidates around it otherwise). Granularity is per tensor (per tie group),
not per decoder layer: a layer's q/k/v, o, gate/up and down differ in sensitivity by orders of
magnitude, and one width per layer would spend the budget on its cheap tensors too.

Planned: every ``linear`` target of the stage, except those a ``plan`` rule gives ``bits`` (they
keep the rule's width, outside the budget); fused experts and embeddings keep the method's
settings (``moe_lp`` plans experts).

```yaml
- kind: quantize
  method: {name: gptq, bits: 3, group_size: 32}
  bits_plan: {name: sensitivity, avg_bits: 3, candidates: [2, 3, 4, 8]}
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from knowpress.arch.sequential import Onload
from knowpress.core.errors import KnowpressError
from knowpress.methods.quant.base import QuantMethod
from knowpress.methods.quant.bit_plans import base
from knowpress.methods.quant.bit_plans.base import BIT_PLANS, BitPlan, Width
from knowpress.methods.quant.plan import Assignment


@BIT_PLANS.register("sensitivity")
class SensitivitySpec(BitPlan):
    summary = "bits per linear by integer programming over Fisher-weighted output error, in bytes"
    paper = "NVIDIA ModelOpt AutoQuantize (Fisher-Taylor scores, knapsack over formats)"

    name: Literal["sensitivity"]
    candidates: list[Width] = Field(default_factory=lambda: [2, 3, 4, 8])
    score: Literal["fisher", "output"] = Field(
        "fisher", description="fisher: loss-gradient weighted (one scale); output: tr(dW H dW^T)"
    )
    tie_inputs: bool = Field(True, description="linears reading one input share one width")

    def check(self, assignments: Sequence[Assignment], method: QuantMethod,
              model: nn.Module) -> None:  # fmt: skip
        super().check(assignments, method, model)
        planned = _planned(assignments)
        if not planned:
            raise KnowpressError(
                "quantize.bits_plan: sensitivity plans linear layers, and the targets hold none "
                "at the method's bits (plan rules with bits keep theirs)"
            )
        from knowpress.methods.quant.bit_plans.scores import by_block

        _, outside = by_block(model, planned)
        head = model.get_output_embeddings()
        stray = [a.target.name for a in outside if model.get_submodule(a.target.module) is not head]
        if stray:
            raise KnowpressError(
                f"quantize.bits_plan: {stray[0]} is outside the decoder blocks and is not the "
                f"output head; sensitivity has no calibration pass for it: drop it from targets"
            )

    def storage_view(self, assignments: list[Assignment]) -> list[Assignment]:
        """The planned linears at the candidates in turn: the plan may mix widths."""
        planned = _planned(assignments)
        widths = {a.target.name: self.candidates[i % len(self.candidates)]
                  for i, a in enumerate(planned)}  # fmt: skip
        return base.with_widths(assignments, widths)

    def budget(self, assignments: Sequence[Assignment], storage: str) -> tuple[torch.Tensor, int]:
        """``B [planned, C]`` (bytes at each candidate) and the byte budget ``avg_bits`` buys."""
        table = torch.tensor(
            [[base.payload_bytes(a.method, a.target, b, storage) for b in self.candidates]
             for a in _planned(assignments)], dtype=torch.int64,
        )  # fmt: skip
        return table, base.byte_budget(table, self.candidates, self.avg_bits)

    def lines(self, model: nn.Module, assignments: list[Assignment], storage: str,
              predicted: int) -> list[str]:  # fmt: skip
        _, budget = self.budget(assignments, storage)
        planned = _planned(assignments)
        at_method = sum(base.payload_bytes(a.method, a.target, getattr(a.method, "bits", 8),
                                           storage) for a in planned)  # fmt: skip
        return [
            f"bits_plan: sensitivity ({self.score}), widths {self.candidates} for "
            f"{len(planned)} linear tensors within {budget:,} bytes of codes, scales and zero "
            f"points ({self.avg_bits:g} bits on average); the stage stores at most about "
            f"{predicted - at_method + budget:,} bytes (the prediction above is at the "
            f"method's bits)"
        ]

    def plan(
        self, model: nn.Module, assignments: list[Assignment], batches: list[torch.Tensor],
        onload: Onload, storage: str,
    ) -> tuple[list[Assignment], dict[str, Any]]:  # fmt: skip
        from knowpress.methods.quant.bit_plans.scores import measure

        planned = _planned(assignments)
        table, budget = self.budget(assignments, storage)
        scores, ties = measure(model, planned, batches, onload, self.candidates,
                               self.score == "fisher")  # fmt: skip
        row = {a.target.name: i for i, a in enumerate(planned)}
        items = ties if self.tie_inputs else [[a.target.name] for a in planned]
        costs = torch.tensor([[sum(scores[n][c] for n in item) for c in range(len(self.candidates))]
                              for item in items], dtype=torch.float64)  # fmt: skip
        sizes = torch.stack([table[[row[n] for n in item]].sum(0) for item in items])
        chosen = base.solve(costs, sizes, self.candidates, budget)
        by_name = {n: w for item, w in zip(items, chosen, strict=True) for n in item}
        widths = {a.target.name: by_name[a.target.name] for a in planned}  # in model order
        spent = sum(int(table[row[n], self.candidates.index(w)]) for n, w in widths.items())
        weights = sum(a.target.shape[0] * a.target.shape[1] for a in planned)
        achieved = sum(w * planned[row[n]].target.shape[0] * planned[row[n]].target.shape[1]
                       for n, w in widths.items()) / weights  # fmt: skip
        details = {
            "name": "sensitivity", "score": self.score, "avg_bits": round(achieved, 4),
            "budget_bytes": budget, "planned_bytes": spent,
            "tensors_per_width": {str(b): list(widths.values()).count(b) for b in self.candidates},
            "widths": widths,
            "scores": {n: [float(f"{s:.4g}") for s in scores[n]] for n in widths},
        }  # fmt: skip
        return base.with_widths(assignments, widths), details


def _planned(assignments: Sequence[Assignment]) -> list[Assignment]:
    """The linear targets whose width the plan chooses (a rule with ``bits`` keeps its own)."""
    return [a for a in assignments if a.target.kind == "linear" and not a.rule_bits]
