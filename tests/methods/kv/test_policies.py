"""Every registered KV policy, on dense and MoE tiny models: generate() and scoring work with
its cache, the cache holds what the policy claims, exact policies change nothing."""

from __future__ import annotations

import default_entries as rows
import pytest
import torch
from transformers import PreTrainedModel

from knowpress.methods.kv import KV_POLICIES
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama, tiny_mixtral, tiny_tokenizer

PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8"]
NEW_TOKENS = 6


MODELS = {"llama": tiny_llama, "mixtral": lambda: tiny_mixtral(layers=2, vocab_size=128)}


def full_bytes_per_token(model: PreTrainedModel) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4  # K and V, fp32


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(rows.KV_POLICIES))
def test_policy_generates_and_scores(name: str, arch: str) -> None:
    block, exact = rows.KV_POLICIES[name]
    policy = KV_POLICIES.get(name).model_validate(block)
    model, tokenizer = MODELS[arch](), tiny_tokenizer()
    plain = TorchRuntime(model, tokenizer)
    with_policy = TorchRuntime(model, tokenizer, kv_policy=policy)
    answers = with_policy.greedy(PROMPTS, NEW_TOKENS)
    scores = with_policy.nll(PROMPTS)
    # the first token of a text is context, not scored
    assert len(answers) == len(PROMPTS) and [s.tokens for s in scores] == [4, 1]
    if exact:
        assert answers == plain.greedy(PROMPTS, NEW_TOKENS)
        assert [s.nats for s in scores] == pytest.approx([s.nats for s in plain.nll(PROMPTS)])
    full = full_bytes_per_token(model)
    per_token = with_policy.kv_bytes_per_token()
    assert per_token == full if exact else per_token < full


@pytest.mark.parametrize("name", sorted(rows.KV_POLICIES))
def test_cache_holds_what_the_policy_claims_after_decoding(name: str) -> None:
    block, exact = rows.KV_POLICIES[name]
    policy = KV_POLICIES.get(name).model_validate(block)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    ids = tokenizer(["w1 w2 w3 w4 w5 w6 w7"], return_tensors="pt")["input_ids"]
    cache = policy.make_cache(model)
    with torch.inference_mode():
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    seen = out.shape[1] - 1  # the last generated token is never fed back
    full = seen * full_bytes_per_token(model)
    held = policy.cache_bytes(cache)
    assert held == full if exact else held < full
