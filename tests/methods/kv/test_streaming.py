"""StreamingLLM eviction: bounded while decoding, and each decoding step computes what a full
cache masked to sinks + window computes."""

from __future__ import annotations

import torch
from kv_helpers import MODELS, generate, left_padded, sharpen
from transformers import DynamicCache

from knowpress.methods.kv import KV_POLICIES


@torch.inference_mode()
def test_the_cache_stays_at_sinks_plus_window_while_decoding() -> None:
    model = sharpen(MODELS["llama"]())
    ids, mask = left_padded([20, 13])
    cache = KV_POLICIES.get("streaming")(name="streaming", sinks=2, budget=7).make_cache(model)
    generate(model, ids, mask, cache, n=6)
    seen = ids.shape[1] + 5  # the last generated token is never fed back
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 7 and layer.get_seq_length() == seen
    # row 1 (13 real tokens after 7 pads): its first 2 real tokens and the last 5
    assert cache.layers[0].pos[1, 0].tolist() == [7, 8, *range(seen - 5, seen)]


@torch.inference_mode()
def test_each_decoding_step_sees_what_a_masked_full_cache_sees() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 18), generator=torch.Generator().manual_seed(5))
    sinks, window, steps = 2, 6, 8
    cache = KV_POLICIES.get("streaming")(name="streaming", sinks=sinks,
                                         budget=sinks + window).make_cache(model)  # fmt: skip
    ours = generate(model, ids, torch.ones_like(ids), cache, n=steps)
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
