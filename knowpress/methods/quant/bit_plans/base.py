"""Bit plans: a quantize stage's widths chosen per tensor (or per expert) by an integer program.

A plan (``bits_plan: {name: ..., avg_bits: X}``) measures, on calibration data, a cost
``c_{i,b}`` for storing item ``i`` (a linear, a group of linears sharing one input, an expert)
at each candidate width ``b``, knows the size ``s_{i,b}`` that width takes, and picks one width
per item with ``x_{i,b} ∈ {0, 1}``::

    min Σ c_{i,b} · x_{i,b}
    s.t. Σ_b x_{i,b} = 1 for every i,   Σ_{i ∈ g} Σ_b s_{i,b} · x_{i,b} ≤ budget_g per group g

solved exactly (``mip_rel_gap`` 0) by ``scipy.optimize.milp`` (HiGHS), the knapsack over
formats of ModelOpt's AutoQuantize. ``solve`` is the one program every plan uses;
``with_widths`` the one place chosen widths become the stage's assignments (a linear's
``bits``, a fused expert tensor's ``expert_bits``); ``payload_bytes`` the bytes one target
stores at a width in the stage's folder format (``formats/sizes.py``, the same entries the
stage's ``predicted_bytes`` sums), so a byte budget is the bytes the saved folder holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError
from knowpress.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from knowpress.arch.sequential import Onload
    from knowpress.methods.quant.base import QuantMethod
    from knowpress.methods.quant.plan import Assignment
    from knowpress.methods.quant.targets import Target

Width = Literal[2, 3, 4, 8]


class BitPlan(FrozenConfig):
    """A plan's config: ``avg_bits`` the mean width it may spend, ``candidates`` the widths."""

    name: str
    avg_bits: float = Field(gt=0, description="mean bits per planned weight (the budget)")
    candidates: list[Width] = Field(default_factory=lambda: [2, 3, 4])

    @model_validator(mode="after")
    def _reachable(self) -> BitPlan:
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates {self.candidates} repeat a width")
        if not min(self.candidates) <= self.avg_bits <= max(self.candidates):
            raise ValueError(
                f"avg_bits {self.avg_bits} is outside the candidates' range "
                f"({min(self.candidates)}..{max(self.candidates)})"
            )
        return self

    def check(self, assignments: Sequence[Assignment], method: QuantMethod,
              model: nn.Module) -> None:  # fmt: skip
        """Refuse (one line) what the plan cannot plan, before any weight is read."""
        if "bits" not in type(method).model_fields:
            raise KnowpressError(f"quantize.bits_plan: {method.name} has no per-tensor bits")
        if getattr(method, "dtype", "int") != "int":
            raise KnowpressError(
                f"quantize.bits_plan: {self.name} chooses integer widths; method.dtype "
                f"{getattr(method, 'dtype', '')} has one width (use dtype: int)"
            )

    def storage_view(self, assignments: list[Assignment]) -> list[Assignment]:
        """The assignments as the plan may leave them (mixed widths), which decides the folder
        format before the plan runs (``compressed_tensors.blocker``)."""
        raise NotImplementedError

    def lines(self, model: nn.Module, assignments: list[Assignment], storage: str,
              predicted: int) -> list[str]:  # fmt: skip
        """What ``--dry-run`` prints of the plan (``predicted``: bytes at the method's bits)."""
        raise NotImplementedError

    def plan(
        self, model: nn.Module, assignments: list[Assignment], batches: list[torch.Tensor],
        onload: Onload, storage: str,
    ) -> tuple[list[Assignment], dict[str, Any]]:  # fmt: skip
        """The assignments with the chosen widths, and the figures for the stage details."""
        raise NotImplementedError


BIT_PLANS: Registry[type[BitPlan]] = Registry("bit plan")


def solve(
    costs: torch.Tensor, sizes: torch.Tensor, candidates: Sequence[int],
    budget: float | Sequence[float], groups: Sequence[int] | None = None,
) -> list[int]:  # fmt: skip
    """The program in the module docstring: ``costs`` and ``sizes`` ``[n, C]``, ``budget`` one
    number or one per group (``groups``: each item's group, default all in group 0); the
    chosen width of each item. Costs are rescaled to a maximum of 1 (the same argmin) so
    HiGHS' tolerances never read small scores as zero."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, c = costs.shape
    labels = list(groups) if groups is not None else [0] * n
    limits = [float(budget)] if isinstance(budget, int | float) else [float(b) for b in budget]
    names = sorted(set(labels))
    if len(limits) != len(names):
        raise ValueError(f"{len(limits)} budgets for {len(names)} groups")
    size = sizes.double().numpy()
    rows = np.stack([np.concatenate([size[i] if labels[i] == g else 0 * size[i]
                                     for i in range(n)]) for g in names])  # fmt: skip
    one_each = np.kron(np.eye(n), np.ones(c))  # Σ_b x_{i,b} = 1
    scale = float(costs.abs().max()) or 1.0
    result = milp(
        (costs.double() / scale).reshape(-1).numpy(), integrality=np.ones(n * c),
        bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0},
        constraints=[LinearConstraint(one_each, 1, 1),
                     LinearConstraint(rows, -np.inf, np.array(limits))],
    )  # fmt: skip
    if not result.success:
        raise KnowpressError(f"bits_plan: the integer program failed ({result.message})")
    choice = result.x.reshape(n, c).argmax(axis=1)
    for k, g in enumerate(names):  # HiGHS' feasibility tolerance must not buy a byte
        spent = sum(size[i, choice[i]] for i in range(n) if labels[i] == g)
        if spent > limits[k]:
            raise KnowpressError(f"bits_plan: the program's answer exceeds its budget ({spent:g} "
                                 f"> {limits[k]:g}); this is a bug, please report it")  # fmt: skip
    return [int(candidates[int(j)]) for j in choice]


def with_widths(
    assignments: Sequence[Assignment], widths: Mapping[str, int | list[int]]
) -> list[Assignment]:
    """``assignments`` with each named target at its chosen width: an int is a tensor's
    ``bits``, a list a fused expert tensor's ``expert_bits`` (one per expert)."""
    out = []
    for a in assignments:
        width = widths.get(a.target.name)
        if width is not None:
            field = "expert_bits" if isinstance(width, list) else "bits"
            a = dataclasses.replace(a, method=a.method.model_copy(update={field: width}))
        out.append(a)
    return out


def payload_bytes(method: QuantMethod, target: Target, bits: int, storage: str) -> int:
    """Bytes ``target`` (a linear) stores at ``bits`` with ``method``'s other settings, in the
    folder format ``storage`` (codes, scales, zero points: no header)."""
    from knowpress.formats.compressed_tensors import FORMAT
    from knowpress.formats.ct_layout import entries, scheme_of
    from knowpress.formats.sizes import payload_bytes as data_bytes

    m: Any = method.model_copy(update={"bits": bits})
    if storage != FORMAT:
        return data_bytes(m.stored_entries(target))
    out_features, n = target.shape
    scheme = scheme_of(m.dtype, bits, m.group(n), m.symmetric, n)
    return data_bytes(entries(target.module, out_features, n, scheme))


def byte_budget(sizes: torch.Tensor, candidates: Sequence[int], avg_bits: float) -> int:
    """Bytes ``avg_bits`` buys for items of ``sizes [n, C]`` (bytes at each candidate): the
    bytes of every item at that width, linear between the two candidates around it, so a
    candidate's budget is exactly the uniform storage at that width."""
    order = sorted(range(len(candidates)), key=lambda j: candidates[j])
    widths = [candidates[j] for j in order]
    hi = next(k for k, b in enumerate(widths) if b >= avg_bits)
    lo = max(k for k, b in enumerate(widths) if b <= avg_bits)
    low, high = sizes[:, order[lo]].double().sum(), sizes[:, order[hi]].double().sum()
    if hi == lo:
        return int(low)
    share = (avg_bits - widths[lo]) / (widths[hi] - widths[lo])
    return int(low + share * (high - low))
