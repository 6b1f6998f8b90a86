"""Dynamic expert skipping (ODP): the slot rule on hand-made weights, the real saving of
expert computation, β = tiny keeps outputs exact, and the policy survives save and load."""

from __future__ import annotations

import torch

from knowpress.methods.experts.skip import ExpertSkip, detach, skip_slots
from knowpress.testing.models import tiny_mixtral

IDS = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(2))


def test_slots_below_beta_times_the_top_weight_are_skipped() -> None:
    index = torch.tensor([[3, 1], [0, 2]])
    weight = torch.tensor([[0.8, 0.2], [0.55, 0.45]])
    new_index, new_weight = skip_slots(index, weight, beta=0.5, sentinel=4, renormalize=True)
    assert new_index.tolist() == [[3, 4], [0, 2]]
    assert torch.allclose(new_weight, torch.tensor([[1.0, 0.0], [0.55, 0.45]]))
    _, raw = skip_slots(index, weight, beta=0.5, sentinel=4, renormalize=False)
    assert torch.allclose(raw, torch.tensor([[0.8, 0.0], [0.55, 0.45]]))


def test_skipping_computes_fewer_experts_and_a_tiny_beta_changes_nothing() -> None:
    model = tiny_mixtral(layers=2)
    expected = model(IDS).logits
    counter = ExpertSkip(beta=1e-6).attach(model)
    assert torch.equal(model(IDS).logits, expected) and counter.active_share == 1.0
    calls: list[int] = []
    experts = model.model.layers[0].mlp.experts
    original = experts.forward
    counter = ExpertSkip(beta=0.95).attach(model)  # replaces the earlier hooks

    def counting(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(int((index < experts.num_experts).sum()))
        return original(hidden, index, weight)

    experts.forward = counting  # type: ignore[method-assign]
    skipped = model(IDS).logits
    assert counter.active_share < 1.0 and calls[0] < IDS.numel() * 2
    assert not torch.allclose(skipped, expected)
    detach(model)
    experts.forward = original  # type: ignore[method-assign]
    assert torch.equal(model(IDS).logits, expected)


def test_skipping_under_the_grouped_kernel_matches_the_eager_loop() -> None:
    model = tiny_mixtral(layers=2)
    model.set_experts_implementation("eager")
    ExpertSkip(beta=0.8).attach(model)
    eager = model(IDS).logits
    detach(model)
    model.set_experts_implementation("grouped_mm")
    ExpertSkip(beta=0.8).attach(model)  # sentinels need the eager loop: attach switches to it
    skipped = model(IDS).logits
    assert torch.isfinite(skipped).all() and torch.allclose(skipped, eager, atol=1e-6)
    detach(model)
    assert model.config._experts_implementation == "grouped_mm"


def test_a_packed_expert_tensor_is_dequantized_once_per_forward() -> None:
    import knowpress.tensors.qexperts as qexperts
    from knowpress.methods.quant import QUANT_METHODS
    from knowpress.methods.quant.targets import select

    model = tiny_mixtral(layers=1)
    method = QUANT_METHODS.get("rtn")(name="rtn", bits=4, group_size=32)
    for target in select(model, ["re:.*experts.*"], []):
        method.round_target(model, target)
    ExpertSkip(beta=0.01).attach(model)  # the eager loop reads W[e] for every expert hit
    calls: list[str] = []
    real = qexperts.dequantized

    def counting(
        module: torch.nn.Module, name: str, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        calls.append(name)
        return real(module, name, dtype)

    qexperts.dequantized = counting  # type: ignore[assignment]
    try:
        model(IDS)
    finally:
        qexperts.dequantized = real  # type: ignore[assignment]
    assert sorted(calls) == ["down_proj", "gate_up_proj"]
