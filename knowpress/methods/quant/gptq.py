"""GPTQ: weight quantization that corrects each column's rounding error on calibration data.

Frantar et al. 2023 (arXiv:2210.17323); the solver is ``gptq_solver.py``. Blocks are processed
in order (sequential GPTQ): block ``i``'s Hessians ``H = 2 XᵀX / n`` come from its inputs as
the blocks before it compute them *after* their own quantization, so later layers correct for
earlier errors. Targets outside the decoder blocks (an untied output head named in
``targets``) are solved last on the fully quantized trunk; an embedding table, which has no
input Hessian, is rounded group-wise first, so the blocks' Hessians see the table as stored.
Calibration: the batches the stage hands it (``data.calibration``, the world's training
text by default; ``pipeline/calibration.py``). The stored format is RTN's
(``QuantLinear``: codes, fp16 scales, zero points), so GPTQ and RTN differ only in which codes
they choose, and ``details.modules`` reports each layer's output error on the calibration data:
relative MSE ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and the matching SQNR in dB.

```yaml
- kind: quantize
  method: {name: gptq, bits: 4, group_size: 128, act_order: true, damp: 0.01}
```

``act_order`` is on by default, as in GPTQModel (group-aware reordering) and llm-compressor
(static activation order): columns are solved in decreasing ``diag(H)`` order, so the
columns that matter most are fixed first and their error spreads over the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from knowpress.arch.layers import LayerInput, decoder_layers
from knowpress.arch.sequential import Onload, blocks, tail_logits
from knowpress.core.errors import KnowpressError
from knowpress.core.measure import trim_heap
from knowpress.methods.quant.base import (
    QUANT_METHODS,
    Calibration,
    GroupWise,
    QuantMethod,
    as_linear,
)
from knowpress.methods.quant.gptq_solver import gptq_quantize
from knowpress.tensors.grids import Grid, dequantize
from knowpress.tensors.qexperts import current_weight, install, joined, spec_for
from knowpress.tensors.qlinear import QuantLinear

if TYPE_CHECKING:
    from knowpress.core.progress import Progress
    from knowpress.methods.quant.targets import Target

MIN_EXPERT_ROWS = 16  # calibration tokens an expert needs for its own Hessian


class _LastGram:
    """``xᵀx`` of the last input seen, kept with the input itself: q/k/v (and gate/up) receive
    the same tensor object in turn, so its product is computed once (exactly the same)."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def of(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs is not self.input or self.gram is None:
            x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
            self.input, self.gram = inputs, x.T @ x  # the reference keeps its address unique
        return self.gram


class _Collector:
    """Accumulates ``Σ xᵀx`` and the row count of a linear layer's inputs (forward pre-hook)."""

    def __init__(self, module: nn.Module, last: _LastGram | None = None) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.last = last or _LastGram()
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        gram = self.last.of(args[0])
        self.sum = gram.clone() if self.sum is None else self.sum + gram
        self.rows += args[0].numel() // args[0].shape[-1]

    def hessian(self) -> torch.Tensor:
        self.handle.remove()
        self.last.input = self.last.gram = None  # the pass is over: hold no [in, in] copy
        if self.sum is None:
            raise RuntimeError("GPTQ: a target saw no calibration input")
        hessian, self.sum = 2.0 * self.sum / self.rows, None  # the sum freed once made
        return hessian


class _ExpertCollector:
    """Per-expert ``Σ xᵀx`` for the fused tensors of an experts module, from the tokens the
    router sends to each expert (forward pre-hook on ``forward(hidden, top_k_index, ...)``):
    ``gate_up_proj`` sees the expert's tokens, ``down_proj`` its ``act(gate) · up``."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in ("gate_up_proj", "down_proj")]
        if unknown or not hasattr(module, "act_fn"):
            raise KnowpressError(
                f"gptq: fused experts {type(module).__name__} ({', '.join(names)}) are not in "
                f"the gate_up_proj/down_proj layout GPTQ knows (Mixtral, Qwen-MoE, OLMoE); "
                f"quantize them with rtn"
            )
        self.module, self.names = module, list(names)
        self.sums: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
        self.rows: dict[int, int] = {}
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = hidden.detach().reshape(-1, hidden.shape[-1]).float()
        chosen = index.reshape(x.shape[0], -1)
        gate_up = (
            current_weight(module, "gate_up_proj").float() if "down_proj" in self.names else None
        )
        for expert in torch.unique(chosen).tolist():
            if not 0 <= expert < module.num_experts:
                continue
            xe = x[(chosen == expert).any(-1)]
            self.rows[expert] = self.rows.get(expert, 0) + xe.shape[0]
            if "gate_up_proj" in self.names:
                self._add("gate_up_proj", expert, xe)
            if gate_up is not None:
                gate, up = (xe @ gate_up[expert].T).chunk(2, dim=-1)
                self._add("down_proj", expert, module.act_fn(gate) * up)

    def _add(self, name: str, expert: int, x: torch.Tensor) -> None:
        total = self.sums[name].get(expert)
        self.sums[name][expert] = x.T @ x if total is None else total + x.T @ x

    def hessians(self, name: str) -> dict[int, torch.Tensor]:
        """Expert -> ``2 XᵀX / n`` (experts no token reached are absent)."""
        return {e: 2.0 * s / self.rows[e] for e, s in self.sums[name].items()}


@QUANT_METHODS.register("gptq")
class GPTQ(GroupWise):
    summary = "GPTQ: per-column rounding with Hessian error feedback from calibration data"
    paper = "Frantar et al. 2023, arXiv:2210.17323"

    name: Literal["gptq"]
    bits: Literal[2, 3, 4, 8] = 4
    act_order: bool = Field(
        True, description="columns by falling Hessian diagonal, groups kept static"
    )
    damp: float = Field(0.01, gt=0, lt=1, description="fraction of mean(diag H) added")
    block: int = Field(128, gt=0, description="columns per lazy error update")

    def apply(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        calibration: Calibration,
        progress: Progress,
        plan: Mapping[str, QuantMethod] | None = None,
        onload: Onload | None = None,
    ) -> dict[str, Any]:
        """Block by block (``arch/sequential.py``): each decoder block onloaded, its targets'
        Hessians collected on its inputs and solved, the block re-run for the next one."""
        onload = onload or Onload(next(model.parameters()).device)
        batches = calibration(_max_positions(model))
        prefix, layers = decoder_layers(model)
        by_layer: dict[int, list[Target]] = {}
        outside: list[Target] = []
        for table in [t for t in targets if t.kind == "embedding"]:
            method = (plan or {}).get(table.name, self)
            assert isinstance(method, GroupWise)
            method.round_target(model, table)  # a lookup table has no input Hessian: rounded
        for target in [t for t in targets if t.kind != "embedding"]:
            index = _layer_index(target.module, prefix)
            (outside if index is None else by_layer.setdefault(index, [])).append(target)
        errors: dict[str, dict[str, float]] = {}
        fallback: list[str] = []
        final: list[LayerInput] = []
        steps = blocks(model, batches, onload, final if outside else None)
        for step in progress.track(steps, f"{self.name}: layers", total=len(layers)):
            chosen = by_layer.get(step.index, [])
            if chosen:
                collectors = _collectors(model, chosen)
                step.run()
                self._solve_all(model, chosen, collectors, plan, errors, fallback)
                step.changed = True
        if outside:  # the head, on the fully quantized trunk's last hidden states
            _check_head(model, outside)
            collectors = _collectors(model, outside)
            for _ in tail_logits(model, final, onload):
                pass
            self._solve_all(model, outside, collectors, plan, errors, fallback)
        return {"modules": errors, **({"rtn_fallback_experts": fallback} if fallback else {})}

    def _solve_all(
        self, model: nn.Module, targets: Sequence[Target], collectors: dict[str, Any],
        plan: Mapping[str, QuantMethod] | None, errors: dict[str, dict[str, float]],
        fallback: list[str],
    ) -> None:  # fmt: skip
        for target in targets:
            method = (plan or {}).get(target.name, self)  # a copy of self with the plan's bits
            assert isinstance(method, GPTQ)
            if target.kind == "fused_experts":
                collector = collectors[target.module]
                errors[target.name] = method._solve_experts(model, target, collector, fallback)
            else:
                errors[target.module] = method._solve(model, target, collectors[target.name])
            trim_heap()  # the solve's [in, in] temporaries, back before the next target's
        for collector in collectors.values():  # solved: later passes must not feed them
            collector.handle.remove()

    def _solve(self, model: nn.Module, target: Target, collector: _Collector) -> dict[str, float]:
        linear = as_linear(model.get_submodule(target.module))
        h = collector.hessian()
        g = self.group(linear.in_features)
        q = gptq_quantize(linear.weight, h, self.bits, g, self.symmetric, self.act_order,
                          self.damp, self.block, self.dtype)  # fmt: skip
        packed = QuantLinear.from_quantized(linear, q, self.bits, g, self.name, self.dtype)
        model.set_submodule(target.module, packed)
        return output_error(linear.weight, packed.dequantized_weight(torch.float32), h)

    def _solve_experts(
        self, model: nn.Module, target: Target, collector: _ExpertCollector, fallback: list[str]
    ) -> dict[str, float]:
        """Each expert with its own Hessian; experts that saw fewer than ``MIN_EXPERT_ROWS``
        calibration tokens are rounded (RTN) and listed, never left float."""
        module = model.get_submodule(target.module)
        weight = current_weight(module, target.attribute).float()
        g = self.group(weight.shape[2])
        hessians = collector.hessians(target.attribute)
        parts, noise, signal = [], 0.0, 0.0
        for expert in range(weight.shape[0]):
            w, h, bits = weight[expert], hessians.get(expert), self.bits_of(expert)
            if h is None or collector.rows.get(expert, 0) < MIN_EXPERT_ROWS:
                fallback.append(f"{target.name}[{expert}]")
                parts.append(self.quantize_weight(w, bits))
                continue
            q = gptq_quantize(w, h, bits, g, self.symmetric, self.act_order, self.damp,
                              self.block, self.dtype)  # fmt: skip
            parts.append(q)
            grid = Grid(self.dtype, bits, self.symmetric, None, q.global_scale)
            err = output_error(w, dequantize(q.codes, q.scales, q.zeros, grid, g), h)
            noise, signal = noise + err["noise"], signal + err["signal"]
        spec = spec_for(weight, self.bits, g, self.symmetric, self.name, self.expert_bits,
                        self.dtype)  # fmt: skip
        install(module, target.attribute, spec, parts if self.expert_bits else joined(parts))
        rel = noise / signal if signal > 0 else math.nan
        return {"rel_mse": rel, "sqnr_db": 10 * math.log10(1 / rel) if rel > 0 else math.inf}


def _collectors(model: nn.Module, targets: Sequence[Target]) -> dict[str, Any]:
    """A ``_Collector`` per linear target (by tensor name), one ``_ExpertCollector`` per
    experts module (by module name) for its fused targets."""
    out: dict[str, Any] = {}
    fused: dict[str, list[str]] = {}
    last = _LastGram()  # shared: modules fed the same input in turn share its product
    for target in targets:
        if target.kind == "fused_experts":
            fused.setdefault(target.module, []).append(target.attribute)
        else:
            out[target.name] = _Collector(model.get_submodule(target.module), last)
    for module, names in fused.items():
        out[module] = _ExpertCollector(model.get_submodule(module), names)
    return out


def output_error(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """Relative output MSE ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the calibration inputs, its SQNR
    in dB, and the two traces (``noise``, ``signal``) to sum over experts."""
    w = weight.detach().float()
    delta = w - approx.float()
    noise = float(torch.einsum("oi,ij,oj->", delta, h, delta))
    signal = float(torch.einsum("oi,ij,oj->", w, h, w))
    rel = noise / signal if signal > 0 else math.nan
    sqnr = 10 * math.log10(1 / rel) if rel > 0 else math.inf
    return {"rel_mse": rel, "sqnr_db": sqnr, "noise": noise, "signal": signal}


def _check_head(model: nn.Module, outside: Sequence[Target]) -> None:
    """Outside the decoder blocks, GPTQ solves the output head only (its inputs are the final
    norm's outputs); anything else there has no calibration inputs in a block-wise pass."""
    head = model.get_output_embeddings()
    for target in outside:
        if model.get_submodule(target.module) is not head:
            raise KnowpressError(
                f"gptq: {target.name} is outside the decoder blocks and is not the output "
                f"head; GPTQ cannot collect its inputs, so quantize it with rtn (a second "
                f"quantize stage) or drop it from targets"
            )


def _layer_index(module: str, prefix: str) -> int | None:
    if not module.startswith(prefix + "."):
        return None
    head = module[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _max_positions(model: nn.Module) -> int:
    config = model.config.get_text_config(decoder=True)
    return int(getattr(config, "max_position_embeddings", 2048))
