"""GPTQ as a quant method: sequential layers, fused experts with per-expert Hessians, output
error closer to the float model than RTN's, per-module errors in the stage details."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from knowpress.core.progress import Progress
from knowpress.methods.quant.gptq import GPTQ
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.tensors.qexperts import packed_names
from knowpress.testing.models import tiny_llama, tiny_mixtral

IDS = torch.tensor([[(7 * i) % 124 + 4 for i in range(48)]])  # text like the calibration's


def _logit_error(make: Callable[[], torch.nn.Module], method: object, ctx: Callable) -> float:
    reference, model = make(), make()
    targets = select(model, None, ["lm_head"])
    method.apply(model, targets, ctx(model), Progress(False))  # type: ignore[attr-defined]
    with torch.no_grad():
        return float(((model(IDS).logits - reference(IDS).logits) ** 2).mean())


def test_gptq_tracks_the_float_model_closer_than_rtn(
    calibrated: Callable[[torch.nn.Module], Any],
) -> None:
    for make in (lambda: tiny_llama(hidden_size=128, intermediate_size=256),
                 lambda: tiny_mixtral(vocab_size=128)):  # fmt: skip
        gptq = _logit_error(make, GPTQ(name="gptq", bits=3, group_size=32), calibrated)
        rtn = _logit_error(make, RTN(name="rtn", bits=3, group_size=32), calibrated)
        assert gptq < rtn, (gptq, rtn)


def test_fused_experts_get_their_own_hessians_and_every_expert_is_packed(
    calibrated: Callable[[torch.nn.Module], Any],
) -> None:
    model = tiny_mixtral(vocab_size=128)
    targets = select(model, None, ["lm_head"])
    metrics = GPTQ(name="gptq", bits=4, group_size=32).apply(
        model, targets, calibrated(model), Progress(False))  # fmt: skip
    experts = model.model.layers[0].mlp.experts
    assert sorted(packed_names(experts)) == ["down_proj", "gate_up_proj"]
    modules = metrics["modules"]
    assert set(modules) == {t.name if t.kind == "fused_experts" else t.module for t in targets}
    assert all(m["sqnr_db"] > 10 for m in modules.values())  # 4-bit: output error well under
    assert metrics.get("rtn_fallback_experts", []) == []  # 16 x 64 tokens reach all four
