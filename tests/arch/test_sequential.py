"""Block-wise execution (``arch/sequential.py``): onloading restores every tensor exactly,
block-wise forwards equal the whole model's, and the passes built on it (GPTQ, expert
statistics) give bit-identical results to whole-model forwards with hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from knowpress.arch.layers import decoder_layers
from knowpress.arch.sequential import Onload, Onloaded, sequential_log_probs
from knowpress.core.progress import Progress
from knowpress.methods.experts.stats import ExpertStats, _accumulate, expert_stats
from knowpress.methods.quant.gptq import GPTQ, _collectors, _layer_index
from knowpress.methods.quant.targets import select
from knowpress.testing.models import tiny_llama, tiny_mixtral

CPU = torch.device("cpu")
BATCHES = [torch.tensor([[(7 * i + 3 * b) % 124 + 4 for i in range(40)] for b in range(3)])
           for _ in range(2)]  # fmt: skip


def _held_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters in bf16, buffers (rotary tables) as built: a bf16 checkpoint as loaded."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def _bf16_exact(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every float parameter rounded to bf16 (kept float32): a checkpoint
    stored in bf16, as loaded for compute."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def test_onloaded_restores_every_tensor_and_sends_new_ones_home() -> None:
    layer = tiny_llama().to(torch.bfloat16).model.layers[0]
    before = {n: (t, t.dtype, t.clone()) for n, t in [*layer.named_parameters(),
                                                     *layer.named_buffers()]}  # fmt: skip
    moved = Onloaded([layer], CPU, torch.float32, CPU)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    layer.mlp.extra = torch.nn.Linear(2, 2)  # a module a stage put in place meanwhile
    moved.restore()
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        if name.startswith("mlp.extra"):
            assert tensor.device == CPU
            continue
        same, dtype, value = before[name]
        assert tensor is same and tensor.dtype == dtype and torch.equal(tensor, value), name


def test_onloaded_gives_back_unchanged_data_and_keeps_a_change() -> None:
    layer = tiny_llama().to(torch.bfloat16).model.layers[0]
    storage = {n: p.data_ptr() for n, p in layer.named_parameters()}
    moved = Onloaded([layer], CPU, torch.float32, CPU)
    with torch.no_grad():
        layer.mlp.up_proj.weight[0, 0] += 1.0  # a stage changed one value
    moved.restore()
    changed = {n for n, p in layer.named_parameters() if p.data_ptr() != storage[n]}
    assert changed == {"mlp.up_proj.weight"}  # every other tensor is its own storage again
    assert layer.mlp.up_proj.weight.dtype == torch.bfloat16


def test_a_pass_in_a_narrower_dtype_leaves_float32_weights_exact() -> None:
    layer = tiny_llama().model.layers[0]  # held float32, run in bf16: restored unrounded
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    Onloaded([layer], CPU, torch.bfloat16, CPU).restore()
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_mixtral(vocab_size=128)])
def test_block_wise_log_probs_equal_the_whole_model(make: Callable[[], Any]) -> None:
    model = _bf16_exact(make())
    with torch.no_grad():
        whole = [model(input_ids=b, use_cache=False).logits.float().log_softmax(-1)
                 for b in BATCHES]  # fmt: skip
    stored = _held_bf16(_bf16_exact(make()))  # the same weights, as a bf16 checkpoint holds them
    for onload, held in ((Onload(CPU), model), (Onload(CPU, torch.float32, True), stored)):
        blockwise = sequential_log_probs(held, BATCHES, onload)
        assert all(torch.equal(a, b) for a, b in zip(whole, blockwise, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())  # handed back as held


def _whole_model_gptq(model: torch.nn.Module, method: GPTQ) -> None:
    """GPTQ without block-wise execution: for each decoder block, Hessians from forwards of
    the whole model (the blocks before it already quantized), then the solve."""
    targets = select(model, None, ["lm_head"])
    prefix, layers = decoder_layers(model)
    errors: dict[str, Any] = {}
    for index in range(len(layers)):
        chosen = [t for t in targets if _layer_index(t.module, prefix) == index]
        collectors = _collectors(model, chosen)
        with torch.inference_mode():
            for ids in BATCHES:
                model(input_ids=ids, use_cache=False)
        method._solve_all(model, chosen, collectors, None, errors, [])


@pytest.mark.parametrize("make", [lambda: tiny_llama(hidden_size=128, intermediate_size=256),
                                  lambda: tiny_mixtral(vocab_size=128)])  # fmt: skip
def test_block_wise_gptq_codes_are_bit_identical_to_whole_model_gptq(make: Callable) -> None:
    method = GPTQ(name="gptq", bits=4, group_size=32)
    reference = _bf16_exact(make())
    _whole_model_gptq(reference, method)
    runs = {"float32 held": (_bf16_exact(make()), Onload(CPU)),
            "bf16 held, float32 blocks, activations offloaded":
                (_held_bf16(_bf16_exact(make())), Onload(CPU, torch.float32, True))}  # fmt: skip
    expected = {k: v for k, v in reference.state_dict().items() if v.dtype in (torch.uint8,
                torch.int8, torch.int32)}  # fmt: skip
    assert expected  # packed codes exist
    for label, (model, onload) in runs.items():
        targets = select(model, None, ["lm_head"])
        method.apply(model, targets, lambda _: BATCHES, Progress(False), None, onload)
        state = model.state_dict()
        for key, codes in expected.items():
            assert torch.equal(state[key], codes), (label, key)


def test_block_wise_expert_statistics_equal_whole_model_hooks() -> None:
    model = tiny_mixtral(vocab_size=128, layers=2)
    from knowpress.arch.moe import moe_blocks

    blocks = moe_blocks(model)
    hooked = [ExpertStats(layer=b.layer) for b in blocks]
    handles = [b.block.register_forward_pre_hook(
        lambda _m, args, kwargs, b=b, r=r: _accumulate(
            b, r, (args[0] if args else kwargs["hidden_states"]).flatten(0, 1), 512),
        with_kwargs=True) for b, r in zip(blocks, hooked, strict=True)]  # fmt: skip
    with torch.no_grad():
        for ids in BATCHES:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    blockwise = expert_stats(model, BATCHES, onload=Onload(CPU, None, True))
    for a, b in zip(hooked, blockwise, strict=True):
        assert a.tokens == b.tokens and torch.equal(a.counts, b.counts)
        for name in ("weight_sum", "saliency_sum", "cosine_sum"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_calibration_offload_reaches_the_block_wise_passes() -> None:
    from types import SimpleNamespace

    from knowpress.core.specs import CalibrationSpec
    from knowpress.pipeline.blockwise import onload_for

    for offload in (False, True):
        ctx = SimpleNamespace(device=CPU, compute_dtype="float32",
                              calibration=CalibrationSpec(offload=offload))  # fmt: skip
        assert onload_for(ctx) == Onload(CPU, torch.float32, offload)  # type: ignore[arg-type]
