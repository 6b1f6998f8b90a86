"""The GPTQ solver: it beats RTN on the layer's output error, never on the weights alone."""

from __future__ import annotations

import pytest
import torch

from knowpress.methods.quant.gptq_solver import gptq_quantize, hessian
from knowpress.tensors.packing import dequantize_groups, quantize_groups


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [64, 128] and correlated, unevenly scaled inputs [2048, 128] (as real
    activations are: a few channels large, many features shared)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=g) * 0.05
    mixing = torch.randn(128, 128, generator=g) * torch.logspace(0, -1.5, 128).unsqueeze(0)
    inputs = torch.randn(2048, 128, generator=g) @ mixing
    return weight, inputs


def _output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((inputs @ weight.T - inputs @ approx.T) ** 2).mean())


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, 32), (2, 64), (4, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(bits: int, group: int, act_order: bool) -> None:
    weight, inputs = _layer()
    rtn = quantize_groups(weight, bits, group, symmetric=False)
    q = gptq_quantize(weight, hessian(inputs), bits, group, symmetric=False, act_order=act_order)
    rtn_error = _output_error(
        weight, dequantize_groups(rtn.codes, rtn.scales, rtn.zeros, bits, group), inputs
    )
    gptq_error = _output_error(
        weight, dequantize_groups(q.codes, q.scales, q.zeros, bits, group), inputs
    )
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    assert q.codes.shape == weight.shape and int(q.codes.max()) <= 2**bits - 1


def test_isotropic_inputs_make_gptq_rtn_on_the_first_column_and_dead_inputs_zero() -> None:
    weight, _ = _layer()
    q = gptq_quantize(weight, torch.eye(128), 4, 32, symmetric=True)
    rtn = quantize_groups(weight, 4, 32, symmetric=True)
    assert torch.equal(q.codes[:, 0], rtn.codes[:, 0])  # nothing to feed back yet
    h = torch.eye(128)
    h[5, 5] = 0.0  # input 5 never fires
    dead = gptq_quantize(weight, h, 8, 32, symmetric=True)
    assert float(dequantize_groups(dead.codes, dead.scales, None, 8, 32)[:, 5].abs().max()) == 0.0
