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
