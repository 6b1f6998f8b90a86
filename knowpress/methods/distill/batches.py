"""What the distillation trainer reads: batches of token ids and the prompts on-policy steps
continue, from any ``BatchSource`` (the pipeline builds one from a fact world's training
epochs or from calibration texts: ``pipeline/distill_data.py``), and the helpers that shape
them. ``batch(step)`` and ``prompts(step)`` must be pure functions of the step, so a resumed
stage sees the batches the killed one would have seen.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention mask, labels [B, T]
Example = tuple[list[int], int]


def encode_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> list[list[int]]:
    """``<s> text </s>`` token ids per text, truncated to ``seq_len`` tokens."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [[*row, tokenizer.eos_token_id][:seq_len] for row in ids]


class BatchSource(Protocol):
    tokenizer: Any

    @property
    def per_epoch(self) -> int: ...

    def batch(self, step: int) -> Batch:
        """``(input_ids, attention_mask, labels)`` ``[B, T]`` of ``step``."""
        ...

    def prompts(self, step: int) -> list[list[int]]:
        """Token ids of the prompts an on-policy step continues (``<s>`` first)."""
        ...


def collate(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: ``(input_ids, attention_mask, labels)``; pads and each
    row's masked prefix are labelled -100."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, masked) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, masked : len(row)] = ids[i, masked : len(row)]
    return ids, mask, labels


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[B, P]``, padded on the left for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask
