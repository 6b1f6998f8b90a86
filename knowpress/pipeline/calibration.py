"""Calibration data: the token sequences data-aware stages (GPTQ, expert statistics) run.

Texts come from ``data.calibration`` (``recipe.CalibrationSpec``): the world's training text
(``world: train``, the bios and questions the teacher learnt from), its held-out text, both
(``mix``: the two interleaved, as many of each), a local file (the ``evaluate.text`` rules:
.txt paragraphs, .jsonl / .json records with ``field``), or a dataset already in the local
Hugging Face cache. They are shuffled (``seed``), tokenized with the model's tokenizer, joined
with its end-of-sequence token and cut into ``samples`` sequences of ``seq_len`` tokens (at
most ``max_positions``): every position sees real text, as in GPTQ's own calibration on C4
windows.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from knowpress.core.errors import KnowpressError, short

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from knowpress.core.specs import CalibrationSpec


CHUNK = 256  # texts tokenized at a time


def calibration_texts(spec: CalibrationSpec, world: Any) -> list[str]:
    """The spec's texts, before tokenization."""
    if spec.path is not None:
        from knowpress.evaluate.text import TextSpec, load_texts

        return load_texts(TextSpec(path=spec.path, field=spec.field), "data.calibration")[0]
    if spec.dataset is not None:
        return _dataset_texts(spec)
    heldout = list(world.heldout_texts()) if world is not None and spec.world != "train" else []
    method = getattr(world, "training_texts", None)
    train = list(method()) if callable(method) and spec.world != "heldout" else []
    if spec.world == "mix":  # equal shares: the training text outnumbers the held-out bios
        random.Random(spec.seed).shuffle(train)
        texts = [t for pair in zip(train, heldout, strict=False) for t in pair]
    else:
        texts = heldout or train
    if not texts:
        raise KnowpressError(
            f"data.calibration.world: this run has no {spec.world} text to calibrate on (no "
            f"fact world); give data.calibration.path: a .txt or .jsonl file"
        )
    return texts


def _dataset_texts(spec: CalibrationSpec) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise KnowpressError(
            "data.calibration.dataset: the 'datasets' package is not installed "
            "(pip install datasets), or give data.calibration.path"
        ) from None
    name, _, config = str(spec.dataset).partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=spec.split)
    except Exception as exc:  # the datasets library raises many types; all mean "not here"
        first = short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise KnowpressError(
            f"data.calibration.dataset: {spec.dataset} is not available here ({first}); this "
            f"machine has no network, so give a local file with data.calibration.path"
        ) from None
    if spec.field not in rows.column_names:
        raise KnowpressError(
            f"data.calibration.field: {spec.dataset} has no column {spec.field!r} "
            f"(it has {', '.join(rows.column_names)})"
        )
    return [t for t in rows[spec.field] if isinstance(t, str) and t.strip()]


def calibration_ids(
    spec: CalibrationSpec, world: Any, tokenizer: PreTrainedTokenizerBase, max_positions: int
) -> list[list[int]]:
    """``spec.samples`` token sequences of ``min(spec.seq_len, max_positions)`` tokens (the
    last may be shorter when the text runs out)."""
    texts = calibration_texts(spec, world)
    random.Random(spec.seed).shuffle(texts)
    length = min(spec.seq_len, max_positions)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    needed = spec.samples * length
    # tokenized a chunk at a time: a world's whole training text is far more than is needed
    for start in range(0, len(texts), CHUNK):
        for ids in tokenizer(texts[start : start + CHUNK], add_special_tokens=True)["input_ids"]:
            stream.extend([*ids, *separator])
            if len(stream) >= needed:
                break
        if len(stream) >= needed:
            break
    sequences = [stream[i : i + length] for i in range(0, min(len(stream), needed), length)]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise KnowpressError("data.calibration: the calibration text holds no tokens")
    return sequences


def calibration_batches(sequences: list[list[int]], size: int = 8) -> list[Any]:
    """Equal-length sequences stacked ``size`` at a time (a shorter last one alone):
    ``[B, T]`` long tensors with no padding."""
    import torch

    by_length: dict[int, list[list[int]]] = {}
    for seq in sequences:
        by_length.setdefault(len(seq), []).append(seq)
    return [
        torch.tensor(group[i : i + size], dtype=torch.long)
        for group in by_length.values()
        for i in range(0, len(group), size)
    ]
