"""arch/moe.py on every supported architecture: the adapter's routing is the model's own,
pruned models keep working, reload in stock transformers (uniform counts) or knowpress's
loader (uneven), and an expert no token selects is removed without changing any output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from knowpress.arch.moe import ARCHITECTURES, keep_experts, moe_blocks, set_expert_counts
from knowpress.core.errors import KnowpressError
from knowpress.formats.io import load_model
from knowpress.testing.models import tiny_llama, tiny_moe, tiny_tokenizer

IDS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_routing_matches_the_models_own_router(arch: str) -> None:
    model = tiny_moe(arch, layers=2)
    block = moe_blocks(model)[0]
    x = torch.randn(7, 32)
    routing = block.route(x)
    seen: dict[str, torch.Tensor] = {}

    def inputs(_m: object, args: tuple[torch.Tensor, ...]) -> None:
        seen.update(index=args[1], weight=args[2])

    def output(_m: object, _a: object, out: torch.Tensor) -> None:
        seen.update(out=out)

    handles = [block.experts.register_forward_pre_hook(inputs),
               block.experts.register_forward_hook(output)]  # fmt: skip
    model.model.layers[0].mlp(x[None])
    for handle in handles:
        handle.remove()
    # what the block hands its experts is what route() reports
    assert torch.equal(routing.index, seen["index"].reshape(7, -1))
    assert torch.allclose(routing.weight, seen["weight"].float().reshape(7, -1))
    logits = x @ block.router.weight.T
    scores = logits.sigmoid() if arch == "deepseek_v3" else logits.softmax(-1)
    assert torch.allclose(routing.scores, scores, atol=1e-6)
    mixed = sum(block.expert_output(int(routing.index[0, s]), x[:1]) * routing.weight[0, s]
                for s in range(block.top_k))  # fmt: skip
    assert torch.allclose(seen["out"][:1], mixed, atol=1e-5)  # f_j and g_j as the model uses them


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_uniformly_pruned_model_reloads_in_transformers_and_generates(
    arch: str, tmp_path: Path
) -> None:
    model = tiny_moe(arch, layers=2)
    for block in moe_blocks(model):
        keep_experts(block, [1, 3])
    assert set_expert_counts(model, [2, 2]) == {}
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(IDS).logits, expected, atol=1e-5)
    assert all(b.num_experts == 2 for b in moe_blocks(again))
    out = again.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_uneven_counts_load_through_knowpress(tmp_path: Path) -> None:
    from knowpress.formats.manifest import build_manifest, write_manifest

    model = tiny_moe("qwen3_moe", layers=2)
    blocks = moe_blocks(model)
    keep_experts(blocks[0], [0, 2, 3])
    keep_experts(blocks[1], [1, 2])
    structure = set_expert_counts(model, [3, 2])
    assert structure == {"experts_per_layer": [3, 2]}
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    write_manifest(tmp_path, build_manifest(tmp_path, format="hf", dtype="float32",
                                            structure=structure))  # fmt: skip
    loaded, _ = load_model(tmp_path)
    assert [b.num_experts for b in moe_blocks(loaded)] == [3, 2]
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)


def test_removing_an_expert_no_token_selects_changes_no_output() -> None:
    model = tiny_moe("deepseek_v3", layers=1)
    block = moe_blocks(model)[0]
    block.router.e_score_correction_bias[2] = -1e9  # sigmoid scores: never among the top-k
    expected = model(IDS).logits
    keep_experts(block, [0, 1, 3])
    # the same experts, weights and order; only the router's matmul blocking may differ
    assert torch.allclose(model(IDS).logits, expected, rtol=0, atol=1e-6)


def test_top_k_and_unsupported_models_are_clear_errors() -> None:
    block = moe_blocks(tiny_moe("mixtral"))[0]
    with pytest.raises(KnowpressError, match="fewer than top-k"):
        keep_experts(block, [0])
    with pytest.raises(KnowpressError, match="'llama' is not a sparse-MoE architecture"):
        moe_blocks(tiny_llama())


def test_routing_works_when_the_model_computes_in_bfloat16() -> None:
    block = moe_blocks(tiny_moe("mixtral").to(torch.bfloat16))[0]
    routing = block.route(torch.randn(5, 32))  # float inputs, bf16 router
    assert routing.scores.dtype == torch.float32 and routing.index.shape == (5, 2)


def test_a_grouped_router_loses_the_same_number_in_each_group() -> None:
    from knowpress.methods.experts.budget import choose_keep
    from knowpress.testing.models import _MOE_CONFIGS

    config = {**_MOE_CONFIGS["deepseek_v3"], "n_routed_experts": 8, "n_group": 2, "topk_group": 1}
    original = _MOE_CONFIGS["deepseek_v3"]
    _MOE_CONFIGS["deepseek_v3"] = config
    try:
        block = moe_blocks(tiny_moe("deepseek_v3"))[0]
    finally:
        _MOE_CONFIGS["deepseek_v3"] = original
    scores = torch.tensor([8.0, 7, 6, 5, 1, 2, 3, 4])
    assert choose_keep([scores], [2], 0.5, "per_layer", [2]) == [[0, 1, 6, 7]]
    assert block.group_problem(2) is not None and block.group_problem(4) is None
    with pytest.raises(KnowpressError, match="groups cannot lose evenly"):
        choose_keep([scores], [2], 0.125, "per_layer", [2])
    with pytest.raises(KnowpressError, match="move experts between the router's groups"):
        keep_experts(block, [0, 1, 2, 4])
    keep_experts(block, [0, 1, 6, 7])
    assert block.num_experts == 4 and block.router.e_score_correction_bias.shape == (4,)
