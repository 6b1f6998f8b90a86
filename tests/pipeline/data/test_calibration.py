"""Calibration token ids: a seeded stream cut into sequences, tokenized only as far as needed."""

from __future__ import annotations

from pathlib import Path

from knowpress.core.specs import CalibrationSpec
from knowpress.pipeline import calibration
from knowpress.testing.models import tiny_tokenizer


def test_only_the_texts_needed_are_tokenized_and_the_ids_do_not_depend_on_it(
    tmp_path: Path, monkeypatch: object
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"w{i % 90} w{(i * 3) % 90} w{(i * 7) % 90}" for i in range(5000)))
    spec = CalibrationSpec(path=str(text), samples=4, seq_len=16)
    tokenizer = tiny_tokenizer()
    seen: list[int] = []
    real = type(tokenizer).__call__

    def counting(self: object, texts: list[str], **kwargs: object) -> object:
        seen.append(len(texts))
        return real(self, texts, **kwargs)  # type: ignore[arg-type]

    whole = calibration.calibration_ids(spec, None, tokenizer, 64)
    monkeypatch.setattr(type(tokenizer), "__call__", counting)  # type: ignore[attr-defined]
    monkeypatch.setattr(calibration, "CHUNK", 7)  # type: ignore[attr-defined]
    chunked = calibration.calibration_ids(spec, None, tokenizer, 64)
    assert chunked == whole and [len(s) for s in whole] == [16] * 4
    assert sum(seen) <= 21  # 64 tokens are 16 of the 5000 texts (4 tokens each): 3 chunks of 7


class _World:
    def training_texts(self) -> list[str]:
        return [f"t{i}" for i in range(100)]

    def heldout_texts(self) -> list[str]:
        return [f"h{i}" for i in range(10)]


def test_mix_takes_as_many_held_out_as_training_texts() -> None:
    assert calibration.calibration_texts(CalibrationSpec(world="heldout"), _World())[0] == "h0"
    assert len(calibration.calibration_texts(CalibrationSpec(world="train"), _World())) == 100
    mixed = calibration.calibration_texts(CalibrationSpec(world="mix"), _World())
    assert [t[0] for t in mixed] == ["t", "h"] * 10
    assert [t for t in mixed if t[0] == "h"] == [f"h{i}" for i in range(10)]
    assert len({t for t in mixed if t[0] == "t"}) == 10
