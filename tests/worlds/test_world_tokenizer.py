"""The world tokenizer: deterministic bytes, round trips, special tokens."""

from __future__ import annotations

from pathlib import Path

from knowpress.evaluate.metrics import normalize_answer
from knowpress.testing import tiny_world
from knowpress.worlds import WorldConfig, build_tokenizer, generate_world
from knowpress.worlds.tokenizer import DEFAULT_MAX_LENGTH


def test_two_builds_give_identical_tokenizer_json(tmp_path: Path) -> None:
    for name in ("a", "b"):
        build_tokenizer(tiny_world()).save_pretrained(tmp_path / name)
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert a == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_special_tokens_and_bos() -> None:
    tok = build_tokenizer(tiny_world())
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert tok("Q: Where was")["input_ids"][0] == tok.bos_token_id
    assert tok.model_max_length == DEFAULT_MAX_LENGTH
    assert build_tokenizer(tiny_world(), model_max_length=96).model_max_length == 96


def test_round_trip_and_no_unknown_words() -> None:
    world = generate_world(WorldConfig(n_people=40, bios_per_person=1))
    tok = build_tokenizer(world)
    q = world.questions("trained")[0]
    text = f"{q.prompt} {q.answer}"
    ids = tok(text)["input_ids"]
    assert normalize_answer(tok.decode(ids, skip_special_tokens=True)) == normalize_answer(text)
    texts = world.training_texts() + [q.prompt for q in world.questions("heldout")]
    texts += world.heldout_texts()
    assert all(tok.unk_token_id not in row for row in tok(texts)["input_ids"])


def test_every_value_word_is_one_token() -> None:
    world = tiny_world()
    tok = build_tokenizer(world)
    for attribute in world.config.attributes:
        for value in world.value_pool(attribute):
            assert len(tok(value, add_special_tokens=False)["input_ids"]) == len(value.split())
