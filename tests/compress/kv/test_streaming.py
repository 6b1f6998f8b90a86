"""StreamingLLM eviction: exact when the budget holds everything, bounded while decoding, and
each decoding step computes what a full cache masked to sinks + window computes."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel

from knowpress.compress.kv import KV_POLICIES
from knowpress.testing.models import tiny_llama, tiny_mixtral

MODELS = {"llama": lambda: tiny_llama(vocab_size=97),
          "mixtral": lambda: tiny_mixtral(layers=2, vocab_size=97)}  # fmt: skip


def _sharpen(model: PreTrainedModel) -> PreTrainedModel:
    torch.manual_seed(1)  # larger weights: peaked logits, no near-ties between caches
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(
        len(lengths), width, dtype=torch.long)  # fmt: skip
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, 97, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def _generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
              cache: object | None, n: int = 10) -> torch.Tensor:  # fmt: skip
    extra = {} if cache is None else {"past_key_values": cache}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, **extra)  # fmt: skip
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_a_budget_holding_everything_is_exact(arch: str) -> None:
    model = _sharpen(MODELS[arch]())
    ids, mask = _left_padded([20, 13, 7])
    policy = KV_POLICIES.get("streaming")(name="streaming", sinks=4, window=64)
    assert torch.equal(_generate(model, ids, mask, policy.make_cache(model)),
                       _generate(model, ids, mask, None))  # fmt: skip


@torch.inference_mode()
def test_the_cache_stays_at_sinks_plus_window_while_decoding() -> None:
    model = _sharpen(MODELS["llama"]())
    ids, mask = _left_padded([20, 13])
    cache = KV_POLICIES.get("streaming")(name="streaming", sinks=2, window=5).make_cache(model)
    _generate(model, ids, mask, cache, n=6)
    seen = ids.shape[1] + 5  # the last generated token is never fed back
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 7 and layer.get_seq_length() == seen
    # row 1 (13 real tokens after 7 pads): its first 2 real tokens and the last 5
    assert cache.layers[0].pos[1, 0].tolist() == [7, 8, *range(seen - 5, seen)]


@torch.inference_mode()
def test_each_decoding_step_sees_what_a_masked_full_cache_sees() -> None:
    model = _sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 18), generator=torch.Generator().manual_seed(5))
    sinks, window, steps = 2, 6, 8
    cache = KV_POLICIES.get("streaming")(name="streaming", sinks=sinks,
                                         window=window).make_cache(model)  # fmt: skip
    ours = _generate(model, ids, torch.ones_like(ids), cache, n=steps)
    full = DynamicCache(config=model.config)
    token = model(input_ids=ids, past_key_values=full).logits[:, -1].argmax(-1, keepdim=True)
    theirs = [token]
    for t in range(steps - 1):  # the new token sees sinks + the last `window` before it
        total = ids.shape[1] + t + 1
        allow = torch.zeros(total, dtype=torch.bool)
        allow[:sinks] = True
        allow[total - 1 - window :] = True
        bias = torch.zeros(total).masked_fill(~allow, -1e30).view(1, 1, 1, total)
        logits = model(input_ids=token, past_key_values=full, attention_mask=bias,
                       position_ids=torch.tensor([[total - 1]])).logits  # fmt: skip
        token = logits[:, -1].argmax(-1, keepdim=True)
        theirs.append(token)
    assert torch.equal(ours, torch.cat(theirs, dim=-1))
