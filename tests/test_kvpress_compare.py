"""benchmarks/kvpress_compare.py without the kvpress venv: the token ids it hands kvpress,
the scoring of returned answers, and the one-line message when the venv is missing."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from knowpress.testing import tiny_world
from knowpress.worlds.tokenizer import build_tokenizer

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _compare() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:  # the script imports its shared results_io
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "kvpress_compare", BENCHMARKS / "kvpress_compare.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sizes() -> tuple[object, list[tuple[int, list[object], int]]]:
    world = tiny_world()
    return build_tokenizer(world), [
        (n, world.haystack_items(n_bios=n, n_items=3), 4) for n in (1, 2)
    ]


def test_runner_input_hands_kvpress_knowpress_tokens_split_at_the_question() -> None:
    compare = _compare()
    tokenizer, sizes = _sizes()
    args = argparse.Namespace(snapkv_window=8, presses=["SnapKVPress", "KnormPress"],
                              ratios=[0.5], threads=1)  # fmt: skip
    for split in ("context", "prompt"):
        spec = compare.runner_input(Path("/t"), tokenizer, sizes, split, args)
        items = [it for _, group, _ in sizes for it in group]
        assert len(spec["items"]) == len(items)
        for entry, item in zip(spec["items"], items, strict=True):
            prompt = tokenizer(item.prompt, add_special_tokens=True)["input_ids"]
            # the very ids knowpress's runtime prefills, BOS first, cut in two
            assert entry["context_ids"] + entry["question_ids"] == prompt
            assert entry["context_ids"][0] == tokenizer.bos_token_id
            assert (entry["question_ids"] == prompt[-1:]) == (split == "prompt")
            assert entry["max_new_tokens"] == 4 and entry["question"] == item.question
    assert spec["presses"][0] == {
        "name": "SnapKVPress",
        "ratios": [0.5],
        "kwargs": {"window_size": 8},
    }
    assert spec["presses"][1]["kwargs"] == {}


def test_scores_answers_per_size_with_retention_against_the_no_press_run() -> None:
    compare = _compare()
    _, sizes = _sizes()
    gold = [it.answer for _, group, _ in sizes for it in group]
    wrong = ["the " + gold[0].upper() + "!", "nobody", *gold[2:4], "nobody", "nobody"]
    result = {"runs": [
        {"press": None, "compression_ratio": 0.0, "seconds": 1.0, "context_tokens": 9,
         "answers": [gold[0], "nobody", *gold[2:]]},
        {"press": "KnormPress", "compression_ratio": 0.75, "seconds": 1.0, "context_tokens": 9,
         "answers": wrong},
    ]}  # fmt: skip
    rows = {(r["press"], r["bios"]): r for r in compare.score_runs(result, sizes, "context")}
    assert rows[("none", 1)]["em"] == pytest.approx(2 / 3)
    # EM normalises case, articles and punctuation like score_qa: "the X!" matches X
    assert rows[("KnormPress", 1)]["em"] == pytest.approx(2 / 3)
    assert rows[("KnormPress", 1)]["retention"] == pytest.approx(1.0)
    assert rows[("KnormPress", 2)]["em"] == pytest.approx(1 / 3)
    assert rows[("KnormPress", 2)]["retention"] == pytest.approx(1 / 3)
    assert rows[("KnormPress", "mean")]["retention"] == pytest.approx(0.5 / (5 / 6))
    assert rows[("KnormPress", 1)]["kv_budget"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="answers"):
        compare.em_per_size(gold[:-1], sizes)


def test_missing_venv_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(
        SystemExit, match=r"pip install torch==2\.13\.0 \"transformers<5\.3\" kvpress"
    ):
        _compare().venv_python(tmp_path / "nowhere")
