"""Expert statistics on a hand-built router and experts equal values computed by hand; the
budget keeps what it promises; every pruning method in the matrix cuts consistently."""

from __future__ import annotations

import math

import default_entries as rows
import pytest
import torch

from knowpress.arch.moe import moe_blocks
from knowpress.core.errors import KnowpressError
from knowpress.methods.experts import EXPERT_PRUNERS, expert_stats
from knowpress.methods.experts.budget import choose_keep
from knowpress.methods.experts.stats import ExpertStats, _accumulate
from knowpress.testing.models import tiny_mixtral


def _hand_built() -> tuple[torch.Tensor, object]:
    """1 block, 4 experts, top-2, hidden 32: router rows pick coordinates 0..3; expert j
    outputs (j + 1)·silu(x0)·x1 on coordinate 0 only."""
    model = tiny_mixtral(layers=1)
    block = moe_blocks(model)[0]
    with torch.no_grad():
        block.router.weight.zero_()
        for j in range(4):
            block.router.weight[j, j] = 1.0
        block.experts.gate_up_proj.zero_()
        block.experts.down_proj.zero_()
        for j in range(4):
            block.experts.gate_up_proj[j, 0, 0] = 1.0  # gate unit 0 reads x0
            block.experts.gate_up_proj[j, 64, 1] = 1.0  # up unit 0 reads x1
            block.experts.down_proj[j, 0, 0] = float(j + 1)
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([2.0, 1.0, 0.0, 0.0])  # experts 0 and 1
    x[1, :4] = torch.tensor([0.0, 3.0, 1.0, 0.0])  # experts 1 and 2
    x[2, :4] = torch.tensor([1.0, 0.0, 0.0, 2.0])  # experts 3 and 0
    return x, block


def test_statistics_match_hand_computed_values() -> None:
    x, block = _hand_built()
    stats = ExpertStats(layer=0)
    _accumulate(block, stats, x, probe_tokens=3)  # type: ignore[arg-type]

    def pair(a: float, b: float) -> tuple[float, float]:  # top-2 softmax, renormalised
        return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))

    def silu(v: float) -> float:
        return v / (1 + math.exp(-v))

    g0 = pair(2.0, 1.0)  # token 0: experts 0, 1
    g1 = pair(3.0, 1.0)  # token 1: experts 1, 2
    g2 = pair(2.0, 1.0)  # token 2: experts 3, 0
    norm = [silu(2.0) * 1.0, silu(0.0) * 3.0, silu(1.0) * 0.0]  # |silu(x0)·x1| per token
    weights = [g0[0] + g2[1], g0[1] + g1[0], g1[1], g2[0]]
    reap = [(g0[0] * 1 * norm[0] + g2[1] * 1 * norm[2]) / 2, g0[1] * 2 * norm[0] / 2 + 0, 0.0,
            g2[0] * 4 * norm[2]]  # fmt: skip
    assert stats.counts.tolist() == [2, 2, 1, 1] and stats.tokens == 3
    assert stats.frequency.tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert stats.routing_weight.tolist() == pytest.approx([w / 3 for w in weights], abs=1e-6)
    assert stats.reap.tolist() == pytest.approx(reap, abs=1e-6)
    assert stats.flagged(2) == [2, 3]
    # same direction on token 0; tokens 1 and 2 give zero outputs (cosine 0): mean 1/3
    assert stats.similarity[0, 1].item() == pytest.approx(1 / 3)


def test_per_layer_and_global_budgets_keep_what_they_promise() -> None:
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([4.0, 1.0, 2.0, 3.0])]
    assert choose_keep(scores, [2, 2], 0.5, "per_layer") == [[1, 2], [0, 3]]
    # scores over their block's mean: [0.22, 2, 1.11, 0.67] and [1.6, 0.4, 0.8, 1.2]
    assert choose_keep(scores, [1, 1], 0.5, "global") == [[1, 2], [0, 3]]
    assert choose_keep(scores, [3, 1], 0.5, "global") == [[1, 2, 3], [0]]
    with pytest.raises(KnowpressError, match="fewer than its top-k"):
        choose_keep(scores, [3, 3], 0.5, "per_layer")
    with pytest.raises(KnowpressError, match="at most 2 can go"):
        choose_keep(scores, [3, 3], 0.5, "global")


@pytest.mark.parametrize("name", sorted(rows.EXPERT_PRUNERS))
def test_every_method_prunes_consistently_and_the_model_generates(name: str) -> None:
    model = tiny_mixtral(layers=2)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = expert_stats(model, [ids])
    method = EXPERT_PRUNERS.get(name).model_validate(rows.EXPERT_PRUNERS[name])
    blocks = moe_blocks(model)
    keeps = choose_keep([method.scores(s) for s in stats], [2, 2], 0.5, "per_layer")
    for block, record, keep in zip(blocks, stats, keeps, strict=True):
        method.apply(block, record, keep)
    for block in blocks:
        assert block.router.weight.shape[0] == block.experts.gate_up_proj.shape[0] == 2
        assert block.experts.down_proj.shape[0] == block.experts.num_experts == 2
    out = model.generate(ids[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_merge_folds_each_dropped_expert_into_its_most_similar_kept_one() -> None:
    model = tiny_mixtral(layers=1)
    block = moe_blocks(model)[0]
    stats = ExpertStats(layer=0, tokens=10, counts=torch.tensor([4.0, 1.0, 3.0, 2.0]),
                        cosine_sum=torch.tensor([[1.0, 0.9, 0.1, 0.2], [0.9, 1, 0.3, 0.1],
                                                 [0.1, 0.3, 1, 0.8], [0.2, 0.1, 0.8, 1]]),
                        probed=1)  # fmt: skip
    before = block.experts.down_proj.detach().clone()
    EXPERT_PRUNERS.get("merge")(name="merge").apply(block, stats, [0, 2])
    # 1 -> 0 (cosine 0.9), 3 -> 2 (0.8), weights by tokens: (4·W0 + 1·W1) / 5, (3·W2 + 2·W3) / 5
    assert torch.allclose(block.experts.down_proj[0], (4 * before[0] + before[1]) / 5)
    assert torch.allclose(block.experts.down_proj[1], (3 * before[2] + 2 * before[3]) / 5)


def test_the_precheck_restores_the_model_exactly() -> None:
    from knowpress.methods.experts.precheck import PrecheckSpec, precheck

    model = tiny_mixtral(layers=2)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(4))
    stats = expert_stats(model, [ids])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("reap", "merge"):
        method = EXPERT_PRUNERS.get(name)(name=name)
        estimate = precheck(model, moe_blocks(model), stats, method, "per_layer", [ids],
                            PrecheckSpec(), 0.5)  # fmt: skip
        assert set(estimate["kl_by_sparsity"]) == {"0.25", "0.5"}  # 1 or 2 of 4 experts
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert all(b.num_experts == 4 for b in moe_blocks(model))
