"""Every task keeps per-item results its statistic turns back into its score, aligned item by
item with the reference's, so the report's intervals and paired tests resample what the
score measured."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowpress.evaluate.evaluator import evaluate_reference, evaluate_runtime
from knowpress.evaluate.intervals import record_of, row_uncertainty
from knowpress.evaluate.uncertainty import STATISTICS, _sorted
from knowpress.runtimes.torch import TorchRuntime
from knowpress.worlds import load_world

TASKS = ["recall", "paraphrase", "long_context", "bits", "perplexity", "kl"]


@pytest.fixture(scope="module")
def scored(tiny_teacher_dir: Path) -> tuple[dict, dict]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    noisy = copy.deepcopy(teacher)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for weight in (noisy.lm_head.weight, noisy.model.layers[0].mlp.down_proj.weight):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 0.6)
    world = load_world(tiny_teacher_dir)
    reference, states = evaluate_reference(TorchRuntime(teacher, tokenizer), world, TASKS, 12)
    compared = evaluate_runtime(TorchRuntime(noisy, tokenizer), world, TASKS, 12, None, states)
    return reference, compared


@pytest.mark.parametrize("task", TASKS)
def test_the_statistic_of_the_items_is_the_score(task: str, scored: tuple[dict, dict]) -> None:
    for scores in scored:
        score = scores[task]
        assert score.statistic in STATISTICS and score.items
        columns, strata = _sorted(score.items)
        value = STATISTICS[score.statistic]({k: a[None] for k, a in columns.items()}, strata)
        assert float(value[0]) == pytest.approx(
            score.score, rel=1e-6, abs=1e-12
        )  # kl: float32 mean
    reference, compared = scored
    assert {k: len(v) for k, v in reference[task].items.items()} == {
        k: len(v) for k, v in compared[task].items.items()
    }  # paired item by item


def test_flips_in_the_extras_match_the_items(scored: tuple[dict, dict]) -> None:
    reference, compared = scored
    kl = compared["kl"]
    counted = sum(kl.items["text_positions"])
    assert kl.extra["flips/lost"] == pytest.approx(sum(kl.items["lost"]) / counted)
    assert kl.extra["flips/lost"] + kl.extra["flips/gained"] > 0  # the noise moved some tokens
    assert reference["kl"].extra["flips/lost"] == 0 and reference["kl"].score == 0
    recall = np.array(compared["recall"].items["correct"])
    ref = np.array(reference["recall"].items["correct"])
    assert compared["recall"].extra["flips/lost"] == pytest.approx(
        np.mean((ref == 1) & (recall == 0))
    )


def test_every_task_of_a_row_gets_intervals(scored: tuple[dict, dict]) -> None:
    reference, compared = scored
    tasks = {t: {"relative": s.relative, "higher_is_better": s.higher_is_better}
             for t, s in reference.items()}  # fmt: skip
    items = {t: record_of(s) for t, s in compared.items()}
    ref_items = {t: record_of(s) for t, s in reference.items()}
    intervals, paired = row_uncertainty(items, ref_items, tasks)
    for task, entry in intervals.items():
        low, high = entry["score"]
        assert low <= compared[task].score + 1e-12 and compared[task].score <= high + 1e-12, task
        if tasks[task]["relative"]:  # none only where retention is undefined (reference 0)
            assert (entry["retention"] is None) == (reference[task].score == 0), task
    assert "retention" not in intervals["kl"] and intervals["kl"]["top1"][1] <= 1
    assert set(paired) == {"recall", "paraphrase", "long_context", "kl"}
    assert paired["kl"]["mcnemar_p"] is None and paired["kl"]["unit"] == "text tokens"
    assert 0 <= paired["recall"]["mcnemar_p"] <= 1
