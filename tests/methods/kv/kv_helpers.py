"""Shared by the eviction tests: tiny dense and MoE models with peaked logits, left-padded
batches, greedy generation with or without a policy's cache."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from knowpress.testing.models import tiny_llama, tiny_mixtral

MODELS = {"llama": lambda: tiny_llama(vocab_size=97),
          "mixtral": lambda: tiny_mixtral(layers=2, vocab_size=97)}  # fmt: skip


def sharpen(model: PreTrainedModel) -> PreTrainedModel:
    torch.manual_seed(1)  # larger weights: peaked logits, no near-ties between caches
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(
        len(lengths), width, dtype=torch.long)  # fmt: skip
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, 97, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
              cache: object | None, n: int = 10) -> torch.Tensor:  # fmt: skip
    extra = {} if cache is None else {"past_key_values": cache}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, **extra)  # fmt: skip
    return out[:, ids.shape[1] :]
