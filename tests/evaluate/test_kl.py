"""Teacher agreement: KL golden values, exactness on a small vocabulary, flips on an oracle,
and a recipe on a model with no fact world gated by max_kl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from knowpress.cli.app import EXIT_GATE, main
from knowpress.evaluate.tasks import TASKS
from knowpress.evaluate.tasks.kl import position_kl
from knowpress.evaluate.text import TextSpec, TextWorld, load_texts
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama, tiny_tokenizer

P = torch.tensor([0.7, 0.2, 0.1])
Q = torch.tensor([0.2, 0.5, 0.3])


def test_position_kl_golden_and_the_rest_bucket() -> None:
    # DESIGN.md check vector: FKL(p || q) = 0.5838; with p kept as its top token + the rest
    # bucket: 0.7 ln(0.7/0.2) + 0.3 ln(0.3/0.8) = 0.5827, a lower bound
    full = position_kl(Q.log()[None], torch.tensor([[0, 1, 2]]), P.log()[None],
                       torch.tensor([float("-inf")]))  # fmt: skip
    assert float(full) == pytest.approx(0.5838, abs=1e-4)
    top1 = position_kl(Q.log()[None], torch.tensor([[0]]), P.log()[None, :1],
                       torch.tensor([math.log(0.3)]))  # fmt: skip
    assert float(top1) == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.3 * math.log(0.3 / 0.8))
    assert float(top1) < float(full)
    # two positions: the task's score is their mean; identical distributions give exactly 0
    two = position_kl(torch.stack([Q.log(), P.log()]), torch.tensor([[0, 1, 2]] * 2),
                      torch.stack([P.log(), P.log()]), torch.full((2,), float("-inf")))  # fmt: skip
    assert two.tolist() == pytest.approx([0.5838, 0.0], abs=1e-4) and float(two[1]) == 0.0


def _text_world(tmp_path: Path, vocab: int) -> TextWorld:
    words = [f"w{i}" for i in range(vocab - 4)]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(12)]
    (tmp_path / "notes.txt").write_text("\n\n".join(lines))
    return TextWorld(*load_texts(TextSpec(path=str(tmp_path / "notes.txt"))))


def test_kl_is_exact_on_a_small_vocabulary_and_zero_for_the_reference(tmp_path: Path) -> None:
    vocab = 60  # <= TOP_K: the reference's whole distribution is kept
    world = _text_world(tmp_path, vocab)
    reference = TorchRuntime(tiny_llama(seed=0, vocab_size=vocab), tiny_tokenizer(vocab))
    model = TorchRuntime(tiny_llama(seed=1, vocab_size=vocab), tiny_tokenizer(vocab))
    task = TASKS.get("kl")()
    state = task.run(reference, world, None).state
    itself = task.run(reference, world, None, state)
    assert itself.score == 0.0 and itself.extra["top1"] == 1.0
    other = task.run(model, world, None, state)
    # by hand, on the same token ids: full distributions of both models
    ids, lengths = state["text/ids"].tolist(), state["text/lengths"].tolist()
    cont, cont_lengths = state["continuation/ids"].tolist(), state["continuation/lengths"]
    sequences, offset = [], 0
    for n in lengths:
        sequences.append((ids[offset : offset + n], 0))
        offset += n
    offset = 0
    for n in cont_lengths.tolist():
        sequences.append((cont[offset : offset + n], int(state["continuation/first"][0])))
        offset += n
    per_position = []
    for seq, first in sequences:
        with torch.no_grad():
            logp = torch.log_softmax(reference.model(torch.tensor([seq])).logits[0, :-1], -1)
            logq = torch.log_softmax(model.model(torch.tensor([seq])).logits[0, :-1], -1)
        per_position.append((logp.exp() * (logp - logq)).sum(-1)[first:])
    expected = torch.cat(per_position)
    assert other.n == expected.numel() and other.score == pytest.approx(
        float(expected.mean()), rel=1e-4
    )
    assert other.extra["kl_p99"] == pytest.approx(
        float(torch.quantile(expected.double(), 0.99)), rel=1e-3
    )
    assert 0 < other.extra["top1"] < 1 and other.extra["kl/continuation"] > 0
    assert state["continuation/lengths"].tolist() == [16 + 112] * 12  # 128 positions: 16 + 112


def test_flips_count_exactly_on_an_oracle() -> None:
    from test_knowledge_tasks import WORLD, FakeRuntime  # the hand-built oracle runtime

    task = TASKS.get("recall")()
    oracle = FakeRuntime(WORLD, oracle=True)
    reference = task.run(oracle, WORLD, None)
    n = reference.n
    wrong = {item.prompt for item in WORLD.questions("trained")[:5]}  # 5 lost
    oracle._answers.update({p: "Nowhere" for p in wrong})
    lost = task.run(oracle, WORLD, None, reference.state)
    assert lost.extra["flips/lost"] == 5 / n and lost.extra["flips/gained"] == 0.0
    assert lost.score == (n - 5) / n
    regained = task.run(FakeRuntime(WORLD, oracle=True), WORLD, None, lost.state)
    assert regained.extra["flips/gained"] == 5 / n and regained.extra["flips/lost"] == 0.0


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A randomly initialised tiny Llama saved with save_pretrained: no world, no knowpress."""
    root = tmp_path_factory.mktemp("plain")
    tiny_llama(seed=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    _text_world(root, 128)
    return root / "model", root / "notes.txt"


def _recipe(tmp_path: Path, model: Path, text: Path, **gate: float) -> Path:
    recipe = {
        "version": 1,
        "model": {"path": str(model)},
        "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": b, "group_size": 32}}
                   for b in (8, 2)],
        "evaluate": {"tasks": ["kl", "perplexity"], "text": {"path": str(text)}},
        **({"gate": gate} if gate else {}),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_model_with_no_world_is_scored_on_a_text_file(
    plain_model: tuple[Path, Path], tmp_path: Path
) -> None:
    model, text = plain_model
    assert (
        main(["apply", str(_recipe(tmp_path, model, text)), "-o", str(tmp_path / "o"), "-q"]) == 0
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    reference, int8, int2 = report["rows"]
    assert reference["scores"]["kl"] == 0.0 and "kl" not in reference["retention"]
    assert 0 < int8["scores"]["kl"] < int2["scores"]["kl"]  # fewer bits, further away
    assert int8["details"]["kl"]["extra"]["top1"] > int2["details"]["kl"]["extra"]["top1"]
    assert report["tasks"]["kl"]["relative"] is False
    assert report["inputs"]["world"]["text"]["path"] == str(text)
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert "kl (kl_nats_per_token)" in markdown


def test_max_kl_fails_a_run_that_exceeds_it(plain_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = plain_model
    path = _recipe(tmp_path, model, text, max_kl=1e-4, min_top1=0.5)
    assert main(["apply", str(path), "-o", str(tmp_path / "o"), "-q"]) == EXIT_GATE
    gate = json.loads((tmp_path / "o" / "report.json").read_text())["gate"]
    assert not gate["passed"] and gate["failures"][0]["reason"] == "above max_kl"
    loose = _recipe(tmp_path, model, text, max_kl=50.0)
    assert main(["apply", str(loose), "-o", str(tmp_path / "p"), "-q"]) == 0


def test_eval_compares_any_model_with_a_reference_on_a_text(
    plain_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = plain_model
    assert (
        main(["apply", str(_recipe(tmp_path, model, text)), "-o", str(tmp_path / "o"), "-q"]) == 0
    )
    stage = tmp_path / "o" / "stages" / "02-quantize"
    scores = tmp_path / "scores.json"
    argv = ["eval", "--model", str(stage), "--text", str(text), "--tasks", "kl,perplexity", "-q"]
    assert main([*argv, "--reference", str(model), "--json", str(scores)]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    measured = json.loads(scores.read_text())["scores"]["kl"]
    assert measured["score"] == pytest.approx(report["rows"][2]["scores"]["kl"])
    capsys.readouterr()
    assert main(argv) == 2
    assert "kl compares with a reference model; pass --reference DIR" in capsys.readouterr().err
