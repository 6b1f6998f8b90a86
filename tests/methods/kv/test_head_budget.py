"""head_budget: copy-probe head importance, HeadKV allocation, per-head kept counts stored
flat (honest bytes), per-head masked attention equal to a per-head masked full cache, and the
wrapped policy's own ranking at a uniform allocation."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import MODELS, generate, left_padded, sharpen
from transformers import DynamicCache

from knowpress.core.errors import KnowpressError
from knowpress.methods.kv import KV_POLICIES
from knowpress.methods.kv.base import CacheShape
from knowpress.methods.kv.head_budget import ATTENTION
from knowpress.methods.kv.head_importance import (
    SCORES,
    allocate,
    probe_ids,
    retrieval_scores,
    torch_probe,
)
from knowpress.testing.models import tiny_llama

Policy = KV_POLICIES.get("head_budget")


def policy(inner: dict, **fields: object) -> object:
    return Policy.model_validate({"name": "head_budget", "policy": inner, "probe_length": 24,
                                  "probes": 4, **fields})  # fmt: skip


def test_allocation_sums_exactly_and_follows_importance() -> None:
    importance = torch.tensor([[0.5, 0.1, 0.0], [0.2, 0.15, 0.05]])
    for capacity in (1, 7, 64, 1000):
        for floor in (0.0, 0.3, 1.0):
            budget = allocate(importance, capacity, floor)
            assert int(budget.sum()) == capacity * 6 and (budget >= 1).all()
            ideal = floor * capacity + (1 - floor) * capacity * 6 * importance / importance.sum()
            assert ((budget - ideal).abs() <= 1).all() or capacity == 1
    assert allocate(importance, 10, 1.0).unique().tolist() == [10]  # floor 1: uniform
    assert allocate(importance, 100, 0.3).flatten().tolist() == [240, 72, 30, 114, 93, 51]
    assert allocate(torch.zeros(2, 2), 5, 0.0).unique().tolist() == [5]


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_probe_scores_equal_eager_attention_at_the_copy_positions(arch: str) -> None:
    model = sharpen(MODELS[arch]())
    shape = CacheShape.of(model)
    scores = retrieval_scores(torch_probe(model), shape, probes=3, length=10)
    ids = probe_ids(shape, 3, 10)
    assert torch.equal(ids[:, :10], ids[:, 10:]) and len(set(ids[0].tolist())) == 10
    model.config._attn_implementation = "eager"
    weights = model(input_ids=ids, output_attentions=True).attentions  # [P, Hq, 20, 20] each
    rows = torch.arange(10, 20)
    for layer, w in enumerate(weights):
        copy = w[:, :, rows, rows - 10 + 1]  # [P, Hq, L]: query i -> token i - L + 1
        expected = copy.reshape(3, scores.shape[1], -1, 10).mean((0, 2, 3))
        assert torch.allclose(scores[layer], expected, atol=1e-6)
    assert scores.std() > 0  # the heads differ


@torch.inference_mode()
def test_a_head_with_zero_queries_scores_uniform_attention() -> None:
    model = sharpen(MODELS["llama"]())
    with torch.no_grad():  # KV head 1 of layer 0: query heads 2 and 3 see every key alike
        model.model.layers[0].self_attn.q_proj.weight[2 * 16 :] = 0
    scores = retrieval_scores(torch_probe(model), CacheShape.of(model), probes=2, length=12)
    uniform = (1.0 / torch.arange(13, 25, dtype=torch.float64)).mean()  # query i sees i + 1
    assert scores[0, 1].item() == pytest.approx(uniform.item(), rel=1e-5)
    assert scores[0, 0].item() != pytest.approx(uniform.item(), rel=1e-2)


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_each_head_keeps_its_allocation_and_bytes_count_only_kept_tokens(arch: str) -> None:
    model = sharpen(MODELS[arch]())
    ids, mask = left_padded([30, 22])
    hb = policy({"name": "snapkv", "window": 3, "kernel": 3}, budget=6, floor=0.2)
    cache = hb.make_cache(model)
    generate(model, ids, mask, cache, n=5)
    budgets = allocate(hb.importance(torch_probe(model), CacheShape.of(model)), 6, 0.2)
    assert model.config._attn_implementation == ATTENTION
    assert budgets.float().mean() == 6 and len(budgets.unique()) > 1
    c, held = model.config, 0
    head_dim = c.hidden_size // c.num_attention_heads
    for layer, row in zip(cache.layers, budgets, strict=True):
        assert layer.counts == row.tolist() and layer.get_seq_length() == 34
        assert layer.keys.shape == (2, int(row.sum()), head_dim)
        assert (layer.pos[1] >= 8).all()  # row 1's pads went first
        held += 2 * int(row.sum()) * head_dim * 2 * 4  # rows × tokens × D × (K, V) × fp32
    assert hb.cache_bytes(cache) == held
    uniform = KV_POLICIES.get("snapkv")(name="snapkv", budget=6, window=3, kernel=3)
    same = uniform.make_cache(model)
    generate(model, ids, mask, same, n=5)
    assert uniform.cache_bytes(same) == held  # the same average budget, the same bytes


@torch.inference_mode()
def test_a_left_padded_row_keeps_and_generates_what_it_would_alone() -> None:
    model = sharpen(MODELS["llama"]())
    ids, mask = left_padded([20, 13])
    hb = policy({"name": "h2o"}, budget=5, floor=0.2)
    batch = hb.make_cache(model)
    together = generate(model, ids, mask, batch, n=6)
    for row in range(2):
        real = mask[row].bool()
        alone = hb.make_cache(model)
        one = generate(model, ids[row : row + 1, real], mask[row : row + 1, real], alone, n=6)
        assert torch.equal(together[row : row + 1], one)
        pad = int((~real).sum())
        for ours, theirs in zip(batch.layers, alone.layers, strict=True):
            assert torch.equal(ours.pos[row] - pad, theirs.pos[0])


@torch.inference_mode()
def test_a_ratio_budget_averages_that_share_of_the_tokens_seen() -> None:
    model = sharpen(MODELS["llama"]())
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(9))
    cache = policy({"name": "streaming", "sinks": 1}, budget=0.25).make_cache(model)
    generate(model, ids, torch.ones_like(ids), cache, n=5)
    kept = [n for layer in cache.layers for n in layer.counts]
    assert sum(kept) == 6 * len(kept)  # ceil(0.25 * 24 seen) on average


@torch.inference_mode()
def test_each_head_attends_to_exactly_its_kept_tokens() -> None:
    # one layer: a 4-D per-head mask on a full cache reproduces what each head kept
    model = sharpen(tiny_llama(layers=1, vocab_size=97))
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    cache = policy({"name": "h2o", "recent": 0.25}, budget=5, floor=0.0).make_cache(model)
    full = DynamicCache(config=model.config)
    ours = model(input_ids=ids, past_key_values=cache).logits[:, -1]
    theirs = model(input_ids=ids, past_key_values=full).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-5)  # the prompt attends to all of itself
    layer = cache.layers[0]
    for step in range(4):
        total = ids.shape[1] + step + 1
        allow = torch.zeros(4, total, dtype=torch.bool)
        allow[:, -1] = True
        start = 0
        for h, n in enumerate(layer.counts):  # query heads 2h, 2h + 1 share KV head h
            allow[2 * h : 2 * h + 2, layer.pos[0, start : start + n]] = True
            start += n
        token = ours.argmax(-1, keepdim=True)
        bias = torch.zeros(4, total).masked_fill(~allow, -1e30)[None, :, None, :]
        ours = model(input_ids=token, past_key_values=cache).logits[:, -1]
        theirs = model(input_ids=token, past_key_values=full, attention_mask=bias,
                       position_ids=torch.tensor([[total - 1]])).logits[:, -1]  # fmt: skip
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert len(set(layer.counts)) > 1


@pytest.mark.parametrize("inner", ["streaming", "h2o", "snapkv", "rkv"])
@torch.inference_mode()
def test_a_uniform_allocation_is_the_wrapped_policy_itself(inner: str) -> None:
    model = sharpen(MODELS["mixtral"]())
    ids, mask = left_padded([20, 13, 7])
    block = {"name": inner, **({"window": 3, "kernel": 3} if inner in ("snapkv", "rkv") else {})}
    alone = KV_POLICIES.get(inner).model_validate({**block, "budget": 6}).make_cache(model)
    wrapped = policy(block, budget=6, floor=1.0).make_cache(model)
    assert torch.equal(generate(model, ids, mask, wrapped), generate(model, ids, mask, alone))
    for ours, theirs in zip(wrapped.layers, alone.layers, strict=True):
        assert torch.equal(ours.pos.view(theirs.pos.shape), theirs.pos)


@torch.inference_mode()
def test_at_a_full_budget_it_is_sdpa_under_chunked_prefill() -> None:
    model = sharpen(MODELS["llama"]())
    ids, mask = left_padded([20, 13, 7])
    cache = policy({"name": "snapkv", "window": 4}, budget=200).make_cache(model)
    ours = [model(input_ids=ids[:, i : i + 5], attention_mask=mask[:, : i + 5],
                  position_ids=(mask.cumsum(1) - 1).clamp_min(0)[:, i : i + 5],
                  past_key_values=cache).logits for i in range(0, 20, 5)]  # fmt: skip
    model.set_attn_implementation("sdpa")
    theirs = model(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits  # fmt: skip
    real = mask.bool()
    assert torch.allclose(torch.cat(ours, 1)[real], theirs[real], atol=1e-5)


@torch.inference_mode()
def test_beam_search_reorders_the_flat_cache() -> None:
    model = sharpen(MODELS["llama"]())
    ids, mask = left_padded([12, 9])
    cache = policy({"name": "h2o"}, budget=5).make_cache(model)
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, num_beams=3,
                         max_new_tokens=4, do_sample=False, pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 16)
    for layer in cache.layers:
        assert layer.keys.shape[0] == 6 and sum(layer.counts) == layer.keys.shape[1]


def test_importance_is_measured_once_per_model() -> None:
    model = sharpen(MODELS["llama"]())
    hb = policy({"name": "streaming"}, budget=4)
    hb.make_cache(model)
    first = getattr(model, SCORES)[(4, 24)]
    hb.with_budget(8).make_cache(model)
    assert getattr(model, SCORES)[(4, 24)] is first


def test_bad_inputs_are_one_line() -> None:
    from knowpress.testing.models import tiny_moe

    with pytest.raises(ValueError, match="policy: head_budget wraps an eviction policy"):
        policy({"name": "kivi"})
    with pytest.raises(KnowpressError, match="model_type 'olmoe'"):
        policy({"name": "streaming"}).make_cache(tiny_moe("olmoe"))
    with pytest.raises(KnowpressError, match="probe_length 100 makes 200-token probes"):
        policy({"name": "streaming"}, probe_length=100).make_cache(MODELS["llama"]())
    model = MODELS["llama"]()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(KnowpressError, match="attn_implementation='sdpa'"):
        policy({"name": "streaming"}).make_cache(model)
    model.config._attn_implementation = "sdpa"
    cache = policy({"name": "streaming"}).make_cache(model)
    model.set_attn_implementation("eager")  # the per-head mask would be lost: refused
    with pytest.raises(KnowpressError, match="attention became 'eager' after its cache"):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache)


def test_the_policy_round_trips_through_its_saved_form_and_the_stage_budget() -> None:
    from knowpress.methods.kv import policy_from_json

    hb = policy({"name": "rkv", "buffer": 4}, budget=0.25)
    again = policy_from_json(hb.model_dump(), "runtime.kv_policy")
    assert again == hb and again.policy.buffer == 4
    assert hb.with_budget(16).budget == 16 and hb.with_budget(16).policy == hb.policy


def test_a_head_never_gets_more_than_the_tokens_seen_and_the_rest_is_spread() -> None:
    importance = torch.tensor([[8.0, 1.0], [1.0, 0.0]])
    uncapped = allocate(importance, 10, 0.2)
    assert int(uncapped.max()) > 20  # the top head's share exceeds what 20 seen tokens hold
    capped = allocate(importance, 10, 0.2, cap=20)
    assert int(capped.max()) == 20 and int(capped.sum()) == 40  # the average is still 10
    assert (capped[capped < 20] >= uncapped[capped < 20]).all()  # the others got the rest
    # zero-importance heads take the excess evenly
    assert allocate(torch.tensor([[1.0, 0.0, 0.0]]), 10, 0.0, cap=12).tolist() == [[12, 9, 9]]
