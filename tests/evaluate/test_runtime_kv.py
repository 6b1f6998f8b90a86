"""TorchRuntime under a KV policy: a context is prefilled before its question, scoring runs
chunk by chunk through the policy's cache, and both equal the plain paths on a full cache."""

from __future__ import annotations

import pytest
import torch

from knowpress.methods.kv import policy_from_json
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama, tiny_tokenizer

PROMPTS = ["w1 w2 w3 w4 w5 w6 w20 w21", "w9 w8 w7 w22", "w5 w4 w3 w2 w1 w6 w7 w8 w9 w23 w24"]
CONTEXTS = ["w1 w2 w3 w4 w5 w6", "w9 w8 w7", "w5 w4 w3 w2 w1 w6 w7 w8 w9"]
FULL = {"name": "full"}


def _model() -> torch.nn.Module:
    model = tiny_llama()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # peaked logits: no near-ties between the two paths
    return model.eval()


def test_context_then_question_on_a_full_cache_is_the_plain_greedy() -> None:
    model, tok = _model(), tiny_tokenizer()
    split = TorchRuntime(model, tok, kv_policy=policy_from_json(FULL, "t"))
    assert split.greedy(PROMPTS, 6, contexts=CONTEXTS) == TorchRuntime(model, tok).greedy(
        PROMPTS, 6)  # fmt: skip


def test_the_context_is_in_the_cache_before_the_question_is_read() -> None:
    model, tok = _model(), tiny_tokenizer()
    runtime = TorchRuntime(model, tok, kv_policy=policy_from_json(FULL, "t"))
    ids, mask, extra = runtime._prefilled(PROMPTS, CONTEXTS)
    cache = extra["past_key_values"]
    lengths = [len(tok(c)["input_ids"]) for c in CONTEXTS]
    assert cache.get_seq_length() == max(lengths)  # the longest context, left-padded
    assert ids.shape[1] == max(lengths) + 2  # + the longest question
    assert mask.sum(1).tolist() == [len(tok(p)["input_ids"]) for p in PROMPTS]


@pytest.mark.parametrize("policy", [FULL, {"name": "h2o", "budget": 64}])
def test_chunked_scoring_of_a_cache_holding_everything_is_one_forward(policy: dict) -> None:
    model, tok = _model(), tiny_tokenizer()
    chunked = TorchRuntime(model, tok, kv_policy=policy_from_json(policy, "t"))
    chunked.score_chunk = 3
    ours, plain = chunked.nll(PROMPTS), TorchRuntime(model, tok).nll(PROMPTS)
    assert [n.tokens for n in ours] == [n.tokens for n in plain]
    assert [n.nats for n in ours] == pytest.approx([n.nats for n in plain], rel=1e-5)


@torch.inference_mode()
def test_token_by_token_scoring_sees_what_the_streaming_cache_kept() -> None:
    model, tok = _model(), tiny_tokenizer()
    sinks, budget, n = 2, 5, 12
    runtime = TorchRuntime(model, tok, kv_policy=policy_from_json(
        {"name": "streaming", "sinks": sinks, "budget": budget}, "t"))  # fmt: skip
    runtime.score_chunk = 1
    seq = torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    (ours,) = runtime.next_token_logprobs([seq])
    # query i sees the sinks, the last budget - sinks tokens before it, and itself
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allow = (j <= i) & ((j < sinks) | (j >= i - (budget - sinks)))
    bias = torch.zeros(n, n).masked_fill(~allow, -1e30).view(1, 1, n, n)
    logits = model(input_ids=torch.tensor([seq]), attention_mask=bias).logits
    theirs = torch.log_softmax(logits[0, :-1].float(), -1)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize(
    "policy",
    [
        {"name": "streaming", "sinks": 1, "budget": 5},
        {"name": "h2o", "budget": 5},
        {"name": "snapkv", "budget": 5, "window": 2, "kernel": 3},
        {
            "name": "compose",
            "policies": [
                {"name": "streaming", "sinks": 1, "budget": 6},
                {"name": "kivi", "bits": 4, "group_size": 2, "residual": 2},
            ],
        },
    ],
)
def test_a_row_answers_as_it_would_alone_whatever_its_batch_pads(policy: dict) -> None:
    """[pad, context | pad, question]: the kept context tokens of a row with a short
    question are attended (the stored slots' mask is their own, not the tail of the
    positions seen), ties and pads are ranked by position and snapkv pools over real
    tokens only: the batch changes nothing. (KIVI/GEAR blocks follow the columns, so their
    grouping moves with padding; tests/compress/kv checks pads never enter their ranges.)"""
    model, tok = _model(), tiny_tokenizer()
    runtime = TorchRuntime(model, tok, kv_policy=policy_from_json(policy, "t"))
    long_q = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w30 w31 w32 w33 w34 w35 w36 w37"
    batch = runtime.greedy([PROMPTS[2], long_q], 6, contexts=[CONTEXTS[2], "w1 w2"])
    alone = runtime.greedy([PROMPTS[2]], 6, contexts=[CONTEXTS[2]])
    assert batch[0] == alone[0]
    pads = runtime.greedy([PROMPTS[2], "w40 " + long_q], 6, contexts=[CONTEXTS[2], "w40 w1 w2"])
    assert pads[0] == alone[0]
