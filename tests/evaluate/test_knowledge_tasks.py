"""The knowledge tasks: paraphrase, two_hop, long_context, bits, and the near-chance flag."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.evaluator import TaskScore, evaluate_runtime
from knowpress.evaluate.tasks import TASKS, pick
from knowpress.evaluate.tasks.bits import bits_of, knowledge_items
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.render import render_markdown
from knowpress.pipeline.report import load_report
from knowpress.pipeline.runner import apply
from knowpress.runtimes.torch import NLL, TorchRuntime
from knowpress.testing import tiny_world
from knowpress.worlds import WorldConfig, build_tokenizer, generate_world, load_world
from knowpress.worlds.generator import World

ATTRS = ("birth_city", "major", "employer", "pronoun", "company_city")
WORLD = generate_world(
    WorldConfig(seed=2, n_people=12, attributes=ATTRS, bios_per_person=1, in_context_examples=2)
)


class FakeRuntime:
    """Answers from a lookup (``oracle``) or always wrong; NLL = 1 nat + ``value_loss``."""

    name = "fake"

    def __init__(self, world: World, oracle: bool, value_loss: float = 0.0) -> None:
        self.tokenizer = build_tokenizer(world)
        self.max_positions = 256
        self.oracle, self.value_loss, self.world = oracle, value_loss, world
        self.prompts: list[str] = []

    def parameter_count(self) -> int:
        return 1000

    def kv_bytes_per_token(self) -> float:
        return 0.0

    def describe(self) -> dict[str, object]:
        return {"runtime": self.name, "device": "cpu", "dtype": "none", "kv_policy": None}

    @cached_property
    def _answers(self) -> dict[str, str]:
        items = (
            self.world.questions("trained")
            + self.world.questions("heldout")
            + self.world.two_hop_questions()
        )
        for n in range(1, 9):
            items += self.world.haystack_items(n, 32)
        return {item.prompt: item.answer for item in items}

    def _answer(self, prompt: str) -> str:
        if not self.oracle:
            return "Nowhere"
        if prompt not in self._answers:
            raise AssertionError(f"unknown prompt {prompt!r}")
        return self._answers[prompt]

    def greedy(self, prompts: Sequence[str], max_new_tokens: int,
               contexts: Sequence[str | None] | None = None) -> list[str]:  # fmt: skip
        for prompt, context in zip(prompts, contexts or [None] * len(prompts), strict=True):
            assert context is None or prompt.startswith(context + " ")
        self.prompts.extend(prompts)
        return [self._answer(p) for p in prompts]

    def nll(self, texts: Sequence[str]) -> list[NLL]:
        return [NLL(1.0 + (0.0 if t.endswith("A:") else self.value_loss), 5) for t in texts]


@pytest.mark.parametrize("task", ["recall", "paraphrase", "two_hop", "long_context"])
def test_qa_tasks_score_an_oracle_1_and_a_wrong_model_0(task: str) -> None:
    good = TASKS.get(task)().run(FakeRuntime(WORLD, oracle=True), WORLD, None)
    bad = TASKS.get(task)().run(FakeRuntime(WORLD, oracle=False), WORLD, None)
    assert good.score == 1.0 and good.extra["token_f1" if task != "long_context" else "em/bios=1"]
    assert bad.score == 0.0 and bad.examples
    assert good.n == bad.n > 0


def test_paraphrase_asks_held_out_questions_only() -> None:
    runtime = FakeRuntime(WORLD, oracle=True)
    result = TASKS.get("paraphrase")().run(runtime, WORLD, None)
    assert runtime.prompts == [q.prompt for q in WORLD.questions("heldout")]
    assert result.n == len(WORLD.facts())
    corpus = "\n".join(WORLD.training_texts())
    assert not any(p in corpus for p in runtime.prompts)


def test_two_hop_items_and_missing_world_support() -> None:
    runtime = FakeRuntime(WORLD, oracle=True)
    TASKS.get("two_hop")().run(runtime, WORLD, 5)
    assert runtime.prompts == [q.prompt for q in pick(WORLD.two_hop_questions(), 5)]
    facts = set(WORLD.facts())
    hq = dict(WORLD.company_facts())
    for item in WORLD.two_hop_questions():
        (employer,) = [v for s, a, v in facts if s == item.subject and a == "employer"]
        assert item.answer == hq[employer]
    with pytest.raises(ValueError, match="2-hop"):
        TASKS.get("two_hop")().run(runtime, tiny_world(), None)  # no employer in test-tiny
    with pytest.raises(KnowpressError, match="two_hop"):
        TASKS.get("two_hop")().run(runtime, SimpleNamespace(config=None), None)  # type: ignore[arg-type]


def test_long_context_lengths_fit_the_model() -> None:
    runtime = FakeRuntime(WORLD, oracle=True)
    result = TASKS.get("long_context")().run(runtime, WORLD, 8)
    lengths = sorted(int(k.split("=")[1]) for k in result.extra if k.startswith("em/bios="))
    assert lengths == [1, 2, 4]  # 8 bios of 5 sentences do not fit 256 positions
    assert all(result.extra[f"tokens/bios={n}"] <= 256 for n in lengths)
    assert result.extra["tokens/bios=4"] > 128  # the longest length uses over half the context
    assert result.n == (8 // len(lengths)) * len(lengths)  # max_items caps the whole task
    # 1/k per size, a random person's answer; a one-bio haystack has no such failure
    assert result.chance == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert [result.extra[f"chance/bios={n}"] for n in lengths] == [1, 1 / 2, 1 / 4]
    assert result.chance_basis == pytest.approx(
        (result.extra["em/bios=2"] + result.extra["em/bios=4"]) / 2
    )
    names = {p.name for p in WORLD.people}
    assert not any(name in p for p in runtime.prompts for name in names)  # fictional people only
    # Between 2 and 4 bios, the largest haystack that fits is scored too.
    runtime.max_positions = int(result.extra["tokens/bios=4"]) - 1
    runtime.prompts.clear()
    cut = TASKS.get("long_context")().run(runtime, WORLD, 8)
    assert sorted(k for k in cut.extra if k.startswith("em/bios=")) == [
        "em/bios=1",
        "em/bios=2",
        "em/bios=3",
    ]
    assert cut.score == 1.0 and cut.n == (8 // 3) * 3
    assert len(runtime.prompts) == (8 // 3) * 3
    runtime.max_positions = 8
    with pytest.raises(ValueError, match="does not fit"):
        TASKS.get("long_context")().run(runtime, WORLD, 2)


def test_long_context_reports_the_trained_lengths_apart() -> None:
    """A model that reads 1-2 bios but not 4: the headline counts every length, the
    trained-length figure only those up to the world's ``in_context_bios`` (2 here)."""
    world = generate_world(WORLD.config.model_copy(update={"in_context_bios": 2}))
    runtime = FakeRuntime(world, oracle=True)
    four = {item.prompt for item in world.haystack_items(4, 8)}
    runtime._answers.update({prompt: "Nowhere" for prompt in four})
    result = TASKS.get("long_context")().run(runtime, world, 8)
    assert result.extra["em/bios=4"] == 0.0 and result.score == pytest.approx(2 / 3)
    assert result.extra["trained_bios"] == 2 and result.extra["em/trained_lengths"] == 1.0
    untrained = generate_world(WORLD.config.model_copy(update={"in_context_examples": 0}))
    plain = TASKS.get("long_context")().run(FakeRuntime(untrained, oracle=True), untrained, 8)
    assert "em/trained_lengths" not in plain.extra and "trained_bios" not in plain.extra


def test_bits_formula_golden() -> None:
    assert bits_of(10, 8, 0.0) == pytest.approx(30.0)
    assert bits_of(10, 8, math.log(2)) == pytest.approx(20.0)  # 1 bit of loss per fact
    assert bits_of(10, 8, 100.0) == 0.0  # worse than guessing stores nothing
    items, pools = knowledge_items(WORLD)
    assert "company_city" not in pools and pools["company_hq"] == 200 and pools["pronoun"] == 2
    capacity = sum(
        sum(1 for it in items if it.attribute == a) * math.log2(s) for a, s in pools.items()
    )
    certain = TASKS.get("bits")().run(FakeRuntime(WORLD, oracle=True), WORLD, None)
    assert certain.score == pytest.approx(capacity)
    one_bit = TASKS.get("bits")().run(FakeRuntime(WORLD, True, math.log(2)), WORLD, None)
    assert one_bit.score == pytest.approx(capacity - len(items))
    assert one_bit.extra["bits/pronoun"] == pytest.approx(0.0)  # 1 bit lost of 1 bit
    assert certain.extra["bits_per_parameter"] == pytest.approx(capacity / 1000)


def test_chance_values() -> None:
    world = tiny_world()  # pools of 20
    assert TASKS.get("recall")().chance(world) == pytest.approx(1 / 20)
    assert TASKS.get("paraphrase")().chance(world) == pytest.approx(1 / 20)
    assert TASKS.get("two_hop")().chance(WORLD) == pytest.approx(1 / 200)
    assert TASKS.get("bits")().chance(world) is None
    score = TaskScore("x", "exact_match", True, 0.09, 1, {}, [], 0.05)
    assert score.near_chance and not TaskScore("x", "em", True, 0.1, 1, {}, [], 0.05).near_chance
    # long_context: a one-bio haystack read right does not lift the multi-bio score off chance
    read_one = TaskScore("long_context", "em", True, 0.5, 3, {}, [], 0.375, chance_basis=0.25)
    assert read_one.near_chance


class OneBioReader(FakeRuntime):
    """Right on every one-bio haystack, "Nowhere" on the others."""

    def __init__(self, world: World) -> None:
        super().__init__(world, oracle=True)
        self.sizes = {it.prompt: n for n in range(1, 9) for it in world.haystack_items(n, 32)}

    def _answer(self, prompt: str) -> str:
        return super()._answer(prompt) if self.sizes[prompt] == 1 else "Nowhere"


def test_long_context_of_a_model_that_reads_only_one_bio_is_near_chance() -> None:
    """The old chance (mean 1/k over 1, 2, 4 bios = 0.58) let a model that only reads a
    one-bio haystack (score 1/3) pass as reading; per-size chance without the one-bio
    haystack compares 0 at 2 and 4 bios with chance 0.375 and flags it."""
    runtime = OneBioReader(WORLD)
    scores = evaluate_runtime(runtime, WORLD, ["long_context"], 12)
    result = scores["long_context"]
    assert result.extra["em/bios=1"] == 1.0 and result.extra["em/bios=2"] == 0.0
    assert result.score == pytest.approx(1 / 3) and result.chance == pytest.approx(0.375)
    assert result.near_chance
    oracle = evaluate_runtime(FakeRuntime(WORLD, oracle=True), WORLD, ["long_context"], 12)
    assert not oracle["long_context"].near_chance


@pytest.fixture(scope="module")
def teacher_runtime(tiny_teacher_dir: Path) -> TorchRuntime:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    return TorchRuntime(model, AutoTokenizer.from_pretrained(tiny_teacher_dir))


def test_tasks_on_the_tiny_teacher(teacher_runtime: TorchRuntime, tiny_teacher_dir: Path) -> None:
    world = load_world(tiny_teacher_dir)
    tasks = ["recall", "paraphrase", "bits"]
    scores = evaluate_runtime(teacher_runtime, world, tasks, max_items=16)
    assert scores["recall"].score >= 0.9 and not scores["recall"].near_chance
    # held-out phrasings of the same facts: the tiny teacher generalises to few of them
    assert scores["paraphrase"].score < scores["recall"].score and scores["paraphrase"].n == 16
    bits = scores["bits"]
    _, pools = knowledge_items(world)
    capacity = len(world.people) * sum(math.log2(s) for s in pools.values())
    assert 0.5 * capacity < bits.score <= capacity  # the teacher knows most of its facts
    assert bits.extra["bits_per_parameter"] == pytest.approx(bits.score / bits.extra["parameters"])
    long = evaluate_runtime(teacher_runtime, world, ["long_context"], max_items=4)
    assert long["long_context"].extra["max_positions"] == 256
    sizes = [k for k in long["long_context"].extra if k.startswith("em/bios=")]
    assert len(sizes) == 4 and long["long_context"].n == 4  # 1, 2, 4 and 8 bios fit: 1 each
    again = evaluate_runtime(teacher_runtime, world, tasks, max_items=16)
    assert {t: s.score for t, s in again.items()} == {t: s.score for t, s in scores.items()}


def test_report_marks_near_chance_and_bits_per_byte(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    recipe = validate_recipe(
        {
            "version": 1,
            "model": {"world": "test-tiny"},
            "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 8}}],
            "evaluate": {"tasks": ["recall", "bits"], "max_items": 16},
        }
    )
    apply(recipe, tmp_path / "out")
    report = load_report(tmp_path / "out")
    assert report["tasks"]["recall"]["chance"] == pytest.approx(1 / 20)
    assert report["tasks"]["recall"]["near_chance"] is False
    assert report["tasks"]["bits"]["chance"] is None
    for row in report["rows"]:
        per_byte = row["details"]["bits"]["extra"]["bits_per_stored_byte"]
        assert per_byte == pytest.approx(row["scores"]["bits"] / row["stored_bytes"])
    assert "Near chance" not in render_markdown(report)
    report["tasks"]["recall"]["near_chance"] = True
    assert "Near chance (reference < 2x chance" in render_markdown(report)


def test_a_task_near_chance_is_reported_but_left_out_of_the_worst_figure(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """The run's own measurements rebuilt into a report where the reference's recall is near
    chance (chance raised above half its score): recall keeps its column and retention, but
    the worst task is bits, a line says why, and a default gate does not gate recall."""
    import dataclasses
    import json

    from knowpress.evaluate.evaluator import Measurement
    from knowpress.pipeline.context import StageRecord
    from knowpress.pipeline.report import build_report

    spec = {"version": 1, "model": {"world": "test-tiny"},
            "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 2}}],
            "evaluate": {"tasks": ["recall", "bits"], "max_items": 16},
            "gate": {"min_retention": 0.01}}  # fmt: skip
    recipe = validate_recipe(spec)
    out = tmp_path / "out"
    apply(recipe, out)

    def measured(folder: Path) -> Measurement:
        return Measurement.from_json(json.loads((folder / "eval.json").read_text())["measurement"])

    reference, stage = measured(out / "reference"), measured(out / "stages" / "01-quantize")
    recall = reference.scores["recall"]
    reference.scores["recall"] = dataclasses.replace(recall, chance=recall.score)
    stage.scores["recall"] = dataclasses.replace(stage.scores["recall"], score=0.0)  # worst
    record = StageRecord(**json.loads((out / "stages" / "01-quantize" / "knowpress_stage.json")
                                      .read_text()))  # fmt: skip
    report = build_report(recipe=recipe, inputs={"model": "m", "reference": "m", "teacher": "m"},
                          world=load_world(tiny_teacher_dir), reference=reference,
                          reference_bf16_bytes=10**6, stages=[(record, stage)])  # fmt: skip
    row = report["rows"][1]
    assert report["tasks"]["recall"]["near_chance"] and row["retention"]["recall"] == 0.0
    assert row["worst_task"] == "bits" and row["worst_retention"] == row["retention"]["bits"]
    assert any("near chance on recall: left out of the worst-task" in w for w in report["warnings"])
    assert report["gate"]["passed"] and report["gate"]["skipped"] == ["recall"]
    assert "left out of the worst retention" in render_markdown(report)
