"""atomic_dir and save_state: an interrupted write leaves the old output and no temporary files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from knowpress.core import io, train_state
from knowpress.core.train_state import TrainState


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_dir_installs_and_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out"
    for text in ("first", "second"):
        with io.atomic_dir(final) as tmp:
            (tmp / "f.txt").write_text(text)
        assert (final / "f.txt").read_text() == text
    assert _leftovers(tmp_path) == []


def test_atomic_dir_keeps_the_old_output_when_the_body_fails(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "f.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), io.atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("new")
        raise KeyboardInterrupt
    assert (final / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_puts_the_old_output_back_when_the_swap_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt between ``final -> .old`` and ``tmp -> final`` must not lose ``final``."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "f.txt").write_text("old")
    real_replace = os.replace
    calls: list[str] = []

    def cut_second(src: str | Path, dst: str | Path) -> None:
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", cut_second)
    with pytest.raises(KeyboardInterrupt), io.atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("new")
    assert calls[0] == "out" and calls[1].startswith(".tmp-out-")  # cut after final -> .old
    assert (final / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_save_state_removes_its_temporary_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / ".resume-x.safetensors"

    def half_written(tensors: dict[str, torch.Tensor], filename: str, **_: object) -> None:
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_state, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        train_state.save_state(path, model, optimizer, TrainState(step=1), "key")
    assert list(tmp_path.iterdir()) == []
