"""The lm-evaluation-harness bridge: a local task, offline, scored into the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from knowpress.core.errors import KnowpressError
from knowpress.evaluate.lm_eval_bridge import LmEvalSpec, headline, run_lm_eval, write_fact_task
from knowpress.methods.kv.full import FullCache
from knowpress.pipeline.recipe import validate_recipe
from knowpress.pipeline.runner import apply
from knowpress.runtimes.loader import load_runtime
from knowpress.runtimes.torch import TorchRuntime
from knowpress.worlds import load_world

pytest.importorskip("lm_eval", reason="the 'eval' extra is not installed")


@pytest.fixture(scope="module")
def fact_task(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    write_fact_task(load_world(tiny_teacher_dir), folder, max_items=48)
    return folder


def test_headline_metric_choice() -> None:
    assert headline({"acc,none": 0.5, "acc_norm,none": 0.75, "acc_stderr,none": 0.1}) == (
        "acc_norm", 0.75, True,
    )  # fmt: skip
    assert headline({"word_perplexity,none": 12.0, "alias": "x"}) == (
        "word_perplexity", 12.0, False,
    )  # fmt: skip
    with pytest.raises(KnowpressError, match="no numeric metric"):
        headline({"alias": "x"})


def test_fact_task_file_is_a_valid_multiple_choice_set(fact_task: Path) -> None:
    rows = [json.loads(line) for line in (fact_task / "knowpress_facts.jsonl").open()]
    assert len(rows) == 48
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert {r["label"] for r in rows} <= {0, 1, 2, 3} and len({r["label"] for r in rows}) > 1


def test_teacher_knows_its_facts_through_the_harness(
    tiny_teacher_dir: Path, fact_task: Path
) -> None:
    runtime = load_runtime(tiny_teacher_dir)
    spec = LmEvalSpec(tasks=["knowpress_facts"], include_path=str(fact_task))
    scores = run_lm_eval(runtime, spec)
    score = scores["lm_eval/knowpress_facts"]
    assert score.metric == "acc" and score.n == 48 and score.higher_is_better
    assert score.score >= 0.9  # 4-way choice: chance is 0.25
    # the same architecture untrained: the harness really scores the model it is given
    from transformers import AutoModelForCausalLM

    blank = AutoModelForCausalLM.from_config(runtime.model.config)
    blank_runtime = TorchRuntime(blank, runtime.tokenizer)
    assert run_lm_eval(blank_runtime, spec)["lm_eval/knowpress_facts"].score < 0.6


def test_harness_refuses_what_it_cannot_score(tiny_teacher_dir: Path, fact_task: Path) -> None:
    runtime = load_runtime(tiny_teacher_dir)
    spec = LmEvalSpec(tasks=["knowpress_facts"], include_path=str(fact_task))
    runtime.kv_policy = FullCache(name="full")
    with pytest.raises(KnowpressError, match="cannot apply the attached KV policy 'full'"):
        run_lm_eval(runtime, spec)
    with pytest.raises(KnowpressError, match="need a PyTorch model; this artifact runs on onnx"):
        run_lm_eval(SimpleNamespace(name="onnx"), spec)


def test_unknown_task_and_missing_folder(tiny_teacher_dir: Path, fact_task: Path) -> None:
    runtime = load_runtime(tiny_teacher_dir)
    with pytest.raises(KnowpressError, match=r"evaluate\.lm_eval\.tasks: no_such_task not found"):
        run_lm_eval(runtime, LmEvalSpec(tasks=["no_such_task"], include_path=str(fact_task)))
    with pytest.raises(KnowpressError, match=r"include_path: .* is not a directory"):
        run_lm_eval(runtime, LmEvalSpec(tasks=["x"], include_path=str(fact_task / "no")))


def test_missing_harness_is_a_clear_error(
    tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(KnowpressError, match=r"pip install 'knowpress\[eval\]'"):
        run_lm_eval(None, LmEvalSpec(tasks=["knowpress_facts"]))


def test_recipe_reports_harness_tasks_with_retention(
    tiny_teacher_dir: Path, fact_task: Path, tmp_path: Path
) -> None:
    recipe = validate_recipe(
        {
            "version": 1,
            "model": {"world": "test-tiny"},
            "stages": [
                {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}}
            ],
            "evaluate": {
                "tasks": ["recall"],
                "lm_eval": {"tasks": ["knowpress_facts"], "include_path": str(fact_task)},
            },
            "gate": {"min_retention": 0.5, "tasks": ["lm_eval/knowpress_facts"]},
        }
    )
    apply(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "lm_eval/knowpress_facts" in report["tasks"]
    row = report["rows"][-1]
    assert 0.5 <= row["retention"]["lm_eval/knowpress_facts"] <= 1.1
    assert "lm_eval/knowpress_facts" in (tmp_path / "out" / "report.md").read_text()


def test_gate_on_a_harness_task_must_be_evaluated() -> None:
    with pytest.raises(KnowpressError, match=r"gate\.tasks .*lm_eval/other.* are not evaluated"):
        validate_recipe(
            {
                "version": 1,
                "model": {"world": "test-tiny"},
                "stages": [{"kind": "quantize", "method": {"name": "rtn"}}],
                "evaluate": {"tasks": ["recall"], "lm_eval": {"tasks": ["knowpress_facts"]}},
                "gate": {"min_retention": 0.5, "tasks": ["lm_eval/other"]},
            }
        )


def test_cli_eval_runs_harness_tasks_alone(
    tiny_teacher_dir: Path, fact_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from knowpress.cli.app import EXIT_USER, main

    out = tmp_path / "scores.json"
    argv = ["eval", "--model", str(tiny_teacher_dir), "--tasks", "", "-q", "--json", str(out)]
    harness = ["--lm-eval", "knowpress_facts", "--lm-eval-include", str(fact_task)]
    assert main([*argv, *harness, "--lm-eval-limit", "12"]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert (
        list(scores) == ["lm_eval/knowpress_facts"] and scores["lm_eval/knowpress_facts"]["n"] == 12
    )
    assert main([*argv, *harness, "--lm-eval-limit", "0"]) == EXIT_USER
    assert "--lm-eval-limit: Input should be greater than 0" in capsys.readouterr().err
    assert main([*argv]) == EXIT_USER
    assert "nothing to evaluate" in capsys.readouterr().err
