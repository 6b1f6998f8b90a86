"""MoE bit plans: the integer program respects the budget with one width per expert and
prefers bits where the error is; experts stored at mixed widths dequantize and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowpress.arch.moe import moe_blocks
from knowpress.formats.io import load_model, save_model
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.bit_plans.moe_lp import MoELPSpec, solve
from knowpress.methods.quant.targets import select
from knowpress.tensors.qexperts import packed_names
from knowpress.testing.models import tiny_mixtral, tiny_tokenizer


def test_the_program_keeps_the_budget_and_one_width_per_expert() -> None:
    # expert 0's error falls steeply with bits, expert 3 barely cares
    costs = torch.tensor([[100.0, 10.0, 1.0], [50.0, 5.0, 0.5], [2.0, 1.0, 0.5], [0.3, 0.2, 0.1]],
                         dtype=torch.float64)  # fmt: skip
    chosen = solve(costs, [10, 10, 10, 10], [2, 3, 4], avg_bits=3.0)
    assert len(chosen) == 4 and sum(chosen) * 10 <= 3.0 * 40
    assert chosen[0] == 4 and chosen[3] == 2
    assert solve(costs, [10] * 4, [2, 3, 4], avg_bits=2.0) == [2, 2, 2, 2]
    # per block: each pair of experts meets 3 bits on average by itself
    per_block = solve(costs, [10] * 4, [2, 3, 4], avg_bits=3.0, groups=[0, 0, 1, 1])
    assert per_block == [3, 3, 4, 2]  # (3, 3): 10 + 5 beats (4, 2): 1 + 50
    with pytest.raises(ValueError, match="outside the candidates' range"):
        MoELPSpec(name="moe_lp", avg_bits=1.5)


def test_mixed_expert_widths_are_stored_packed_and_reload(tmp_path: Path) -> None:
    model = tiny_mixtral(layers=1)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    widths = [2, 3, 4, 8]
    method = QUANT_METHODS.get("rtn")(name="rtn", bits=4, group_size=32, expert_bits=widths)
    weight = moe_blocks(model)[0].experts.gate_up_proj.detach().clone()
    for target in select(model, ["*.experts.gate_up_proj"], []):
        method.round_target(model, target)
    experts = moe_blocks(model)[0].experts
    assert packed_names(experts)["gate_up_proj"]["expert_bits"] == widths
    error = [float((experts.gate_up_proj[e] - weight[e]).pow(2).mean()) for e in range(4)]
    assert error[0] > error[1] > error[2] > error[3]  # more bits, less error
    assert experts.gate_up_proj_packed.ndim == 1  # the flat mixed layout
    expected = model(ids).logits
    save_model(model, tiny_tokenizer(), tmp_path, dtype=torch.float32)
    again, _ = load_model(tmp_path)
    assert torch.allclose(again(ids).logits, expected, atol=1e-5)
