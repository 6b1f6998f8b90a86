"""Router re-calibration: after experts are pruned and the layers before a block perturbed
(as quantization does), the refitted router agrees with the original's choices more often;
on an unchanged model it keeps every choice."""

from __future__ import annotations

import copy

import torch

from knowpress.arch.moe import keep_experts, moe_blocks
from knowpress.methods.experts.router_fit import kept_ids, recalibrate
from knowpress.pipeline.context import StageRecord
from knowpress.testing.models import tiny_mixtral

BATCHES = [torch.randint(3, 64, (8, 24), generator=torch.Generator().manual_seed(i))
           for i in range(4)]  # fmt: skip


def test_a_refit_router_selects_more_of_what_the_original_selected() -> None:
    original = tiny_mixtral(seed=7, layers=2)
    model = copy.deepcopy(original)
    for block in moe_blocks(model):
        keep_experts(block, [0, 2, 3])
    with torch.no_grad():  # upstream error, as a low-bit attention would make
        for layer in model.model.layers:
            for p in layer.self_attn.parameters():
                p.add_(torch.randn_like(p) * 0.5 * p.std())
    kept = [[0, 2, 3], [0, 2, 3]]
    report = recalibrate(model, original, BATCHES, kept, damp=0.01)
    for row in report:
        assert row["agreement_after"] > row["agreement_before"]
    assert report[0]["agreement_after"] > 0.9


def test_an_unchanged_model_keeps_every_choice() -> None:
    original = tiny_mixtral(seed=8, layers=2)
    model = copy.deepcopy(original)
    report = recalibrate(model, original, BATCHES, [[0, 1, 2, 3]] * 2, damp=0.01)
    assert all(r["agreement_before"] == 1.0 and r["agreement_after"] >= 0.999 for r in report)


def test_kept_ids_compose_over_pruning_stages() -> None:
    def record(kept: dict[str, list[int]]) -> StageRecord:
        return StageRecord(index=0, kind="prune_experts", config={}, hash="h", seconds=0,
                           peak_rss_bytes=0, bytes_before=0, bytes_after=0, checkpoint="",
                           details={"experts_kept": kept})  # fmt: skip

    history = [record({"0": [1, 2, 4, 7]}), record({"0": [0, 3]})]
    assert kept_ids(history, [8]) == [[1, 7]]
