"""Distillation losses: DESIGN.md's check vector, closed-form identities, TRL parity, and a
matrix over every registered loss (``tests/default_entries.py``; test_registries fails on a
registered loss without a row)."""

from __future__ import annotations

import math

import default_entries as rows
import pytest
import torch

from knowpress.methods.distill import DISTILL_LOSSES
from knowpress.methods.distill.losses import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from knowpress.methods.distill.taid import taid_loss, taid_target

P = torch.tensor([0.7, 0.2, 0.1]).log()  # teacher
Q = torch.tensor([0.2, 0.5, 0.3]).log()  # student

LOSS_CASES = rows.DISTILL_LOSSES


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (forward_kl, 0.5838),
        (reverse_kl, 0.5372),
        (tvd, 0.5),
        (lambda s, t: skew_kl(s, t, 0.1), 0.4469),
        # by hand: m = 0.1q + 0.9p = [0.65, 0.23, 0.12]; Σ q log(q/m)
        (lambda s, t: skew_reverse_kl(s, t, 0.1), 0.4274),
        # by hand: m = [0.45, 0.35, 0.2]; ½KL(p‖m) + ½KL(q‖m) = ½(0.12805 + 0.13779)
        (lambda s, t: generalized_jsd(s, t, 0.5), 0.1329),
        # head = {token 0} (mass before token 1 is 0.7 ≥ 0.5); gaps 0.5 / 0.5 → ½FKL + ½RKL
        (lambda s, t: adaptive_kl(s, t, 0.5), 0.5605),
    ],
)
def test_check_vector(fn: object, expected: float) -> None:
    assert fn(Q, P).item() == pytest.approx(expected, abs=1e-4)  # type: ignore[operator]


def test_jsd_endpoints_are_the_two_kls_and_its_limits_agree() -> None:
    assert generalized_jsd(Q, P, 0.0) == pytest.approx(forward_kl(Q, P).item())
    assert generalized_jsd(Q, P, 1.0) == pytest.approx(reverse_kl(Q, P).item())
    beta = 1e-4  # JSD(β)/β → KL(p‖q) as β → 0; JSD(β)/(1−β) → KL(q‖p) as β → 1
    assert (generalized_jsd(Q, P, beta) / beta).item() == pytest.approx(0.5838, abs=2e-3)
    assert (generalized_jsd(Q, P, 1 - beta) / beta).item() == pytest.approx(0.5372, abs=2e-3)


def test_skew_endpoints() -> None:
    assert skew_kl(Q, P, 0.0) == pytest.approx(forward_kl(Q, P).item())
    assert skew_kl(Q, P, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert skew_reverse_kl(Q, P, 0.0) == pytest.approx(reverse_kl(Q, P).item())


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_identical_logits_give_zero_and_positive_otherwise(case: str) -> None:
    loss = DISTILL_LOSSES.get(case).model_validate(LOSS_CASES[case])
    torch.manual_seed(0)
    z = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    labels = z.argmax(-1)
    extra: dict[str, object] = {"interp": 1.0} if loss.stateful else {}
    if loss.extra_models:  # equal base models: the delta is the teacher minus itself
        base = torch.randn(2, 5, 11)
        extra["extra"] = {name: base for name in loss.extra_models}
    same = loss(z, z, mask, labels, **extra)
    if case in ("ce", "taid"):  # cross-entropies: the entropy of the target, not 0
        expected = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean()
        if case == "ce":
            expected = torch.nn.functional.cross_entropy(z.reshape(-1, 11), labels.reshape(-1))
        assert same.item() == pytest.approx(expected.item(), rel=1e-5)
    else:
        assert same.item() == pytest.approx(0.0, abs=1e-6)
        other = loss(z, torch.randn(2, 5, 11), mask, labels, **extra)
        assert other.item() > 1e-3


def test_mask_and_normalizer_give_the_global_token_mean() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss = DISTILL_LOSSES.get("forward_kl").model_validate({"name": "forward_kl"})
    per = forward_kl(s.log_softmax(-1), t.log_softmax(-1))
    assert loss(s, t, mask).item() == pytest.approx(per[mask].mean().item(), rel=1e-6)
    # two micro-batches normalised by the total count sum to the mean over both
    halves = [loss(s[i : i + 1], t[i : i + 1], mask[i : i + 1], normalizer=5) for i in (0, 1)]
    assert sum(halves).item() == pytest.approx(per[mask].mean().item(), rel=1e-6)


def test_temperature_scales_both_sides() -> None:
    loss = DISTILL_LOSSES.get("forward_kl").model_validate({"name": "forward_kl", "temperature": 2})
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = forward_kl((s / 2).log_softmax(-1), (t / 2).log_softmax(-1)).mean()
    assert loss(s, t, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_vocabulary_mismatch_is_one_clear_error() -> None:
    loss = DISTILL_LOSSES.get("reverse_kl").model_validate({"name": "reverse_kl"})
    with pytest.raises(ValueError, match="teacher vocabulary 9 != student vocabulary 7"):
        loss(torch.randn(1, 2, 7), torch.randn(1, 2, 9), torch.ones(1, 2, dtype=torch.bool))


def test_taid_check_vector_and_only_the_student_side_of_the_target_is_detached() -> None:
    z_s = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    z_t = torch.tensor([0.0, 2.0, 0.0], requires_grad=True)
    target = taid_target(z_s, z_t, 0.4)
    assert target.tolist() == pytest.approx([0.3610, 0.4409, 0.1981], abs=1e-4)
    loss = taid_loss(z_s, z_t, 0.4)
    assert loss.item() == pytest.approx(1.1905, abs=1e-4)
    loss.backward()
    # d/dz_s of CE(p_t, softmax(z_s)) with p_t constant in z_s: q − p_t
    q = torch.softmax(z_s.detach(), -1)
    assert z_s.grad is not None and torch.allclose(z_s.grad, q - target.detach(), atol=1e-6)
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0  # the teacher side is not cut


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gjsd_matches_trl(beta: float, temperature: float) -> None:
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(2)
    s, t = torch.randn(3, 6, 13) * 3, torch.randn(3, 6, 13) * 3
    labels = torch.randint(0, 13, (3, 6))
    labels[0, :2] = -100
    ours = DISTILL_LOSSES.get("gjsd").model_validate(
        {"name": "gjsd", "beta": beta, "temperature": temperature}
    )(s, t, labels != -100)
    count = int((labels != -100).sum())
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        s, t, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=count
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)


def test_a_kl_with_a_zero_probability_teacher_token_is_finite_with_finite_gradients() -> None:
    s = torch.tensor([[0.5, 0.1, -0.2]], requires_grad=True)
    t = torch.tensor([[2.0, -math.inf, 0.0]])  # the teacher rules one token out
    value = forward_kl(s.log_softmax(-1), t.log_softmax(-1)).sum()
    value.backward()
    assert math.isfinite(value.item()) and s.grad is not None and torch.isfinite(s.grad).all()


def test_delta_kd_targets_the_student_base_shifted_by_the_teachers_delta() -> None:
    from knowpress.methods.distill.delta_kd import delta_target

    loss = DISTILL_LOSSES.get("delta_kd").model_validate(rows.DISTILL_LOSSES["delta_kd"])
    z_sb, z_t, z_tb = (torch.tensor([[v]]) for v in ([1.0, 0, 0], [0, 2.0, 0], [0, 1.0, 0]))
    assert delta_target(z_sb, z_t, z_tb).tolist() == [[[1.0, 1.0, 0.0]]]
    student = torch.tensor([[[0.0, 0.0, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = loss(student, z_t, mask, extra={"student_base": z_sb, "teacher_base": z_tb})
    # by hand: target p = softmax([1, 1, 0]) = [0.4223, 0.4223, 0.1554], q uniform
    # KL(p ‖ q) = Σ p log p + log 3 = −1.017356 + 1.098612
    assert value.item() == pytest.approx(0.081256, abs=1e-5)
    with pytest.raises(ValueError, match="needs the teacher's and both base models' logits"):
        loss(student, z_t, mask)
