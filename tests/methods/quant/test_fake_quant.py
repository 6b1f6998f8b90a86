"""Fake quantization (``tensors/fake_quant.py``): the straight-through and LSQ gradients on
a hand example, and a packed layer made trainable and packed back unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knowpress.methods.quant.rtn import RTN
from knowpress.tensors.fake_quant import FakeQuantLinear, fake_quantize, stored_scale


@pytest.mark.parametrize(
    ("zero", "expected_wq", "expected_ds"),
    [
        # symmetric 2-bit: z = 2^(b-1) = 2, codes 0..3 -> v in [-2, 1]
        # v = W/s = [-3.2, -0.6, 0.8, 2.4]: below, inside, inside, above
        # dW_q/ds = [-z, round(v) - v, round(v) - v, q_max - z] = [-2, -0.4, 0.2, 1]
        # dL/ds = 1·(-2) + 2·(-0.4) + 3·0.2 + 4·1 = 1.8
        (2.0, [-1.0, -0.5, 0.5, 0.5], 1.8),
        # asymmetric, z = 1 -> v in [-1, 2]: dW_q/ds = [-1, -0.4, 0.2, 2]
        # dL/ds = -1 - 0.8 + 0.6 + 8 = 6.8
        (1.0, [-0.5, -0.5, 0.5, 1.0], 6.8),
    ],
)
def test_straight_through_and_lsq_gradients_by_hand(
    zero: float, expected_wq: list[float], expected_ds: float
) -> None:
    weight = torch.tensor([[-1.6, -0.3, 0.4, 1.2]], requires_grad=True)
    scale = torch.tensor([[0.5]], requires_grad=True)
    wq = fake_quantize(weight, scale, torch.tensor([[zero]]), bits=2, group_size=4)
    assert torch.allclose(wq, torch.tensor([expected_wq]))
    (wq * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert weight.grad is not None and scale.grad is not None
    # pass-through inside the clamp range, zero outside: dL/dW = c · [0, 1, 1, 0]
    assert torch.allclose(weight.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0]]))
    assert scale.grad.item() == pytest.approx(expected_ds, abs=1e-5)


def test_the_stored_scale_rounds_to_fp16_and_passes_its_gradient() -> None:
    scale = torch.tensor([0.1, 0.0, -3.0, 1e6], requires_grad=True)
    stored = stored_scale(scale)
    assert torch.equal(stored, scale.detach().clamp(2.0**-24, 65504.0).half().float())
    stored.sum().backward()
    assert scale.grad is not None
    assert scale.grad.tolist() == [1.0, 0.0, 0.0, 0.0]  # the clamp stops what it cuts


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_packed_layer_made_trainable_packs_back_bit_identical(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    linear = nn.Linear(64, 12, bias=True)
    packed = RTN(name="rtn", bits=bits, group_size=32, symmetric=symmetric).quantize_linear(linear)
    packed.storage = "compressed-tensors"
    fake = FakeQuantLinear(packed, train_weights=True)
    x = torch.randn(5, 64)
    assert torch.equal(fake(x), packed(x))  # the forward is the stored layer's
    back = fake.to_packed()
    assert back.storage == "compressed-tensors" and back.packing_spec() == packed.packing_spec()
    ours, theirs = back.state_dict(), packed.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_trained_weights_and_scales_are_what_gets_packed() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 4, bias=False)
    packed = RTN(name="rtn", bits=3, group_size=16, symmetric=False).quantize_linear(linear)
    fake = FakeQuantLinear(packed, train_weights=True)
    with torch.no_grad():
        fake.latent.add_(torch.randn_like(fake.latent))  # a grid step, on average
        fake.log_scale.add_(0.1)
    back = fake.to_packed()
    assert not torch.equal(back.weight_packed, packed.weight_packed)
    assert torch.equal(back.weight_zero_point, packed.weight_zero_point)  # zero points fixed
    assert torch.equal(back.weight_scale, fake.scale().detach().half())
    x = torch.randn(3, 32)
    assert torch.allclose(back(x), fake(x), atol=1e-6)  # the packed layer is the trained one


def test_scales_only_leaves_the_weight_frozen() -> None:
    linear = nn.Linear(32, 4)
    packed = RTN(name="rtn", bits=4, group_size=32).quantize_linear(linear)
    fake = FakeQuantLinear(packed, train_weights=False)
    trainable = [n for n, p in fake.named_parameters() if p.requires_grad]
    assert trainable == ["log_scale"]


@pytest.mark.parametrize("bits", [2, 8])
def test_one_step_moves_codes_and_scales_by_the_same_share_at_every_width(bits: int) -> None:
    """An AdamW step of lr moves each weight by ~lr grid steps and each scale by a factor of
    ~exp(lr), whatever the width: in raw units lr 0.05 would be many int8 steps."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 8, bias=False)
    packed = RTN(name="rtn", bits=bits, group_size=32).quantize_linear(linear)
    fake = FakeQuantLinear(packed, train_weights=True)
    step = fake.scale().detach().repeat_interleave(32, dim=1)
    weight, scale = fake.weight().detach(), fake.scale().detach()
    optimizer = torch.optim.AdamW(fake.parameters(), lr=0.05, weight_decay=0.0)
    fake(torch.randn(16, 64)).square().sum().backward()
    optimizer.step()
    moved = (fake.weight().detach() - weight).abs() / step
    assert moved.max() <= 0.05 * 1.001 and moved.max() >= 0.04
    factor = (fake.scale().detach() / scale).log().abs()
    assert factor.max() <= 0.05 * 1.001 and factor.max() >= 0.04
