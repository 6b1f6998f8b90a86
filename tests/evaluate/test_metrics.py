"""Answer normalisation, exact match and token F1."""

from __future__ import annotations

import math

import pytest

from knowpress.evaluate.evaluator import worst
from knowpress.evaluate.metrics import exact_match, normalize_answer, token_f1
from knowpress.evaluate.tasks import TASKS, pick
from knowpress.evaluate.tasks.base import pick_by_attribute
from knowpress.runtimes.torch import NLL, perplexity


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  The  Univ. of Paris!", "univ of paris"),
        ("Lake Marion ,", "lake marion"),
        ("an apple", "apple"),
        ("Ann-Marie", "ann marie"),
        ("", ""),
    ],
)
def test_normalize(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_and_punctuation() -> None:
    assert exact_match("lake marion .", "Lake Marion") == 1.0
    assert exact_match("Lake", "Lake Marion") == 0.0


def test_token_f1_golden() -> None:
    assert token_f1("Lake Marion", "Lake Marion") == 1.0
    assert token_f1("Lake", "Lake Marion") == pytest.approx(2 / 3)
    assert token_f1("North Lake Marion", "Lake Marion") == pytest.approx(0.8)
    assert token_f1("Paris", "Lake Marion") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_perplexity_and_retention_directions() -> None:
    assert perplexity([NLL(math.log(2) * 3, 3)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        perplexity([])
    recall, ppl = TASKS.get("recall")(), TASKS.get("perplexity")()
    assert recall.retention(0.45, 0.9) == pytest.approx(0.5)
    assert ppl.retention(4.0, 2.0) == pytest.approx(0.5)  # lower is better
    assert math.isnan(recall.retention(0.5, 0.0))


def test_worst_treats_undefined_as_worst() -> None:
    assert worst({"a": 0.9, "b": 0.8}) == ("b", 0.8)
    assert worst({"a": 0.9, "b": float("nan")})[0] == "b"


def test_pick_is_deterministic_and_spread() -> None:
    items = list(range(100))
    assert pick(items, None) == items
    assert pick(items, 4) == [0, 25, 50, 75]


def test_pick_by_attribute_covers_every_attribute() -> None:
    from knowpress.worlds.generator import QAItem

    # person-major, 5 attributes: plain pick(…, 4) with step 25 would hit "a0" only
    items = [QAItem(f"q{p}{a}", "x", f"p{p}", f"a{a}") for p in range(20) for a in range(5)]
    assert {it.attribute for it in pick(items, 4)} == {"a0"}
    chosen = pick_by_attribute(items, 7)
    assert len(chosen) == 7 and {it.attribute for it in chosen} == {f"a{a}" for a in range(5)}
    assert pick_by_attribute(items, 7) == chosen and pick_by_attribute(items, None) == items
