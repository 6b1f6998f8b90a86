"""Bit plans: the shared integer program meets its byte budget exactly and spends it where the
cost is; the sensitivity plan gives the sensitive tensor more bits, refuses what it cannot
plan in one line, and every registered plan plans its row's model."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import default_entries as rows
import pytest
import torch

from knowpress.arch.sequential import Onload
from knowpress.core.errors import KnowpressError
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.base import QuantMethod
from knowpress.methods.quant.bit_plans import BIT_PLANS, solve
from knowpress.methods.quant.bit_plans.base import byte_budget, payload_bytes
from knowpress.methods.quant.bit_plans.sensitivity import SensitivitySpec
from knowpress.methods.quant.plan import PlanSpec, Rule, resolve
from knowpress.methods.quant.targets import select
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.stages.quantize import QuantizeConfig
from knowpress.testing.models import tiny_llama, tiny_mixtral

RTN3 = {"name": "rtn", "bits": 3, "group_size": 32}


def test_the_program_spends_an_exact_byte_budget_where_the_cost_is() -> None:
    # three tensors; bytes at widths 2/4/8 (codes + fixed scales); tensor 0 is the sensitive one
    sizes = torch.tensor([[300, 550, 1050], [300, 550, 1050], [600, 1100, 2100]])
    costs = torch.tensor([[90.0, 6.0, 0.1], [4.0, 1.0, 0.2], [8.0, 2.0, 0.5]])
    budget = byte_budget(sizes, [2, 4, 8], 4.0)
    assert budget == 550 + 550 + 1100  # a candidate's budget is uniform storage at it
    chosen = solve(costs, sizes, [2, 4, 8], budget)
    # 4/4/4 costs 9 in 2,200 bytes; 8/4/2 costs 9.1; 8/2/4 (6.1) needs 2,450
    assert chosen == [4, 4, 4]
    assert solve(costs, sizes, [2, 4, 8], 2450) == [8, 2, 4]  # 1,050 + 300 + 1,100: exact
    # the brute-force optimum of every budget equals the program's answer, bytes included
    for limit in (1200, 1500, 1950, 2200, 2450, 2800, 4200):
        best = min(
            (sum(float(costs[i, j]) for i, j in enumerate(pick)), pick)
            for pick in itertools.product(range(3), repeat=3)
            if sum(int(sizes[i, j]) for i, j in enumerate(pick)) <= limit
        )[1]
        assert solve(costs, sizes, [2, 4, 8], limit) == [[2, 4, 8][j] for j in best]


def _llama(attention_scale: float = 1.0) -> torch.nn.Module:
    """One layer; ``o_proj`` times ``attention_scale``: at 0.1 the attention branch barely
    reaches the residual stream, so rounding q/k/v/o barely moves the loss and the MLP is
    the sensitive part."""
    model = tiny_llama(seed=5, layers=1).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight *= attention_scale
    return model


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (4, 24), generator=generator) for _ in range(2)]


def _plan(model: torch.nn.Module, **spec: Any) -> tuple[list[Any], dict[str, Any], list[Any]]:
    assignments = resolve(QUANT_METHODS.get("rtn")(**RTN3), None, select(model, None, ["lm_head"]))
    plan = SensitivitySpec(name="sensitivity", avg_bits=3.0, candidates=[2, 4], **spec)
    chosen, details = plan.plan(model, assignments, _batches(), Onload(), "knowpress")
    return chosen, details, assignments


GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


@pytest.mark.parametrize(("scale", "expected"), [(1.0, [4, 4, 2, 2]), (0.1, [2, 2, 4, 2])])
def test_the_sensitive_tensors_get_the_bits_at_the_exact_budget(
    scale: float, expected: list[int]
) -> None:
    chosen, details, assignments = _plan(_llama(scale))
    widths = details["widths"]
    names = [[f"model.layers.0.{'self_attn' if g[0] in 'qkvo' else 'mlp'}.{p}_proj.weight"
              for p in g] for g in GROUPS]  # fmt: skip
    wanted = [[w] * len(g) for g, w in zip(names, expected, strict=True)]
    assert [[widths[n] for n in g] for g in names] == wanted
    # bytes: exactly the chosen candidates' stored bytes, within the budget of uniform 3 bits:
    # 36,864 weights at 3 bits of codes + 1,152 fp16 scales (the same at every width)
    planned = {a.target.name: a for a in assignments}
    spent = sum(payload_bytes(planned[n].method, planned[n].target, w, "knowpress")
                for n, w in widths.items())  # fmt: skip
    assert details["planned_bytes"] == spent <= details["budget_bytes"] == 36864 * 3 // 8 + 2304
    assert {a.target.name: a.method.bits for a in chosen if a.target.name in widths} == widths
    # the program's answer is the brute-force optimum over the four tie groups
    scores = details["scores"]
    best = min(
        (sum(scores[n][j] for g, j in zip(names, pick, strict=True) for n in g), pick)
        for pick in itertools.product(range(2), repeat=4)
        if sum(payload_bytes(planned[n].method, planned[n].target, [2, 4][j], "knowpress")
               for g, j in zip(names, pick, strict=True) for n in g) <= details["budget_bytes"]
    )[1]  # fmt: skip
    assert [widths[g[0]] for g in names] == [[2, 4][j] for j in best]


def test_the_output_score_is_the_hessian_weighted_error() -> None:
    """``output``: tr(ΔW H ΔWᵀ) with H = Σ x xᵀ over the calibration tokens, ΔW = RTN − W."""
    from knowpress.tensors.grids import dequantize

    model = _llama()
    _, details, assignments = _plan(model, score="output", tie_inputs=False)
    down = next(a for a in assignments if a.target.name.endswith("down_proj.weight"))
    seen: list[torch.Tensor] = []
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 128)))
    with torch.no_grad():
        for ids in _batches():
            model(ids)
    handle.remove()
    x = torch.cat(seen).double()
    weight = layer.weight.detach()
    for c, bits in enumerate([2, 4]):
        q = down.method.quantize_weight(weight, bits)
        delta = (dequantize(q.codes, q.scales, q.zeros, down.method.grid().__class__(
            "int", bits, True), 32) - weight).double()  # fmt: skip
        expected = float(torch.einsum("oi,ij,oj->", delta, x.T @ x, delta))
        assert details["scores"][down.target.name][c] == pytest.approx(expected, rel=1e-3)


def _config(method: dict[str, Any], plan: dict[str, Any]) -> QuantizeConfig:
    recipe = validate_recipe({"version": 1, "model": {"path": "./unused"}, "stages": [
        {"kind": "quantize", "method": method, "bits_plan": plan}]})  # fmt: skip
    return recipe.stages[0]  # type: ignore[return-value]


def test_dry_run_prints_the_byte_budget() -> None:
    config = _config(RTN3, {"name": "sensitivity", "avg_bits": 2.5})
    lines = config.check(tiny_llama(layers=1), "float32")
    line = next(x for x in lines if x.startswith("bits_plan: sensitivity"))
    # 2.5 bits: halfway between uniform int2 and int3 storage of the 7 linears (36,864 weights,
    # 1,152 fp16 scales); compressed-tensors also stores each one's int64 weight_shape [2]
    shapes = 7 * 16 if lines[-1] == "format: compressed-tensors" else 0
    assert f"within {36864 * 5 // 16 + 1152 * 2 + shapes:,} bytes" in line


class _NoBits(QuantMethod):
    name: Literal["nobits"]


@pytest.mark.parametrize(
    ("method", "plan", "message"),
    [
        (RTN3, {"name": "sensitivity", "avg_bits": 9}, "outside the candidates' range"),
        (RTN3, {"name": "sensitivity", "avg_bits": 1.5, "candidates": [2, 4]}, "(2..4)"),
        ({"name": "rtn", "dtype": "fp8"}, {"name": "sensitivity", "avg_bits": 3},
         "method.dtype fp8 has one width"),
        (RTN3, {"name": "sensitivity", "avg_bits": 3, "candidates": [2, 2]}, "repeat a width"),
    ],
)  # fmt: skip
def test_refusals_are_one_line(method: dict[str, Any], plan: dict[str, Any], message: str) -> None:
    with pytest.raises(KnowpressError) as caught:
        _config(method, plan).check(tiny_llama(layers=1), "float32")
    assert message in str(caught.value) and "\n" not in str(caught.value).strip()


def test_a_method_without_per_tensor_bits_is_refused() -> None:
    model = tiny_llama(layers=1)
    spec = SensitivitySpec(name="sensitivity", avg_bits=3)
    method = _NoBits(name="nobits")
    with pytest.raises(KnowpressError, match="nobits has no per-tensor bits"):
        spec.check([], method, model)


def test_sensitivity_needs_linear_targets() -> None:
    config = _config(RTN3, {"name": "sensitivity", "avg_bits": 3}).model_copy(
        update={"targets": ["*.experts.*"], "ignore": []}
    )
    with pytest.raises(KnowpressError, match="plans linear layers"):
        config.check(tiny_mixtral(layers=1), "float32")


@pytest.mark.parametrize("name", sorted(rows.BIT_PLANS))
def test_every_plan_plans_its_row(name: str) -> None:
    block, preset = rows.BIT_PLANS[name]
    model = (tiny_mixtral(layers=1) if preset == "moe" else tiny_llama(layers=1)).eval()
    config = _config(RTN3, block)
    assert any(line.startswith(f"bits_plan: {name}") for line in config.check(model, "float32"))
    assignments = config.resolve(model)
    spec = BIT_PLANS.get(name).model_validate(block)
    chosen, details = spec.plan(model, assignments, _batches(), Onload(), "knowpress")
    widths = {
        w for a in chosen for w in (getattr(a.method, "expert_bits", None) or [a.method.bits])
    }
    assert widths <= set(spec.candidates) and details["avg_bits"] <= spec.avg_bits


def test_a_rule_with_bits_keeps_its_width_outside_the_plan() -> None:
    model = tiny_llama(layers=1).eval()
    config = _config(RTN3, {"name": "sensitivity", "avg_bits": 3.0, "candidates": [2, 4]})
    config = config.model_copy(update={"plan": PlanSpec(rules=[Rule(match="*.down_proj", bits=8)])})
    assignments = config.resolve(model)
    spec = SensitivitySpec(name="sensitivity", avg_bits=3.0, candidates=[2, 4])
    chosen, details = spec.plan(model, assignments, _batches(), Onload(), "knowpress")
    assert "model.layers.0.mlp.down_proj.weight" not in details["widths"]
    assert len(details["widths"]) == 6
    down = next(a for a in chosen if a.target.name.endswith("down_proj.weight"))
    assert down.method.bits == 8
