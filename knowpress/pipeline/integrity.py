"""The integrity check of a quantize stage, on the folder it is about to install.

GPTQModel and ModelOpt MoE checkpoints have shipped with experts silently left in bf16 and
layers left unquantized (Model-Optimizer#1323, GPTQModel#2271/#1680); a knowpress stage fails
instead, before anything is installed, when:

- a targeted tensor is not packed at its planned bits and group size in the saved folder, or
  a float copy of it was stored beside the codes;
- the stored bytes are more than 1% off the plan's prediction;
- the model reloaded from the folder does not produce the in-memory model's greedy tokens
  (the in-memory model's untouched tensors rounded to the deploy dtype first, as stored).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.sizes import read_header, safetensors_files
from knowpress.tensors.packing import packed_width

if TYPE_CHECKING:
    from knowpress.methods.quant.plan import Assignment
    from knowpress.pipeline.context import Context

TOLERANCE = 0.01
PROBES = 8  # prompts whose greedy tokens must survive the round trip
PROBE_TOKENS = 8


def check_folder(
    assignments: list[Assignment], folder: Path, predicted: int, storage: str = "knowpress"
) -> None:
    """Packed at the planned settings in the folder format ``storage``, no float copy, bytes
    within 1% of ``predicted``."""
    header: dict[str, Any] = {}
    for file in safetensors_files(folder):
        header.update(read_header(file))
    stored = sum(f.stat().st_size for f in safetensors_files(folder))
    for a in assignments:
        name, method = a.target.name, a.method
        if name in header:
            raise KnowpressError(f"integrity: {name} was stored as a float tensor beside its codes")
        codes = header.get(f"{name}_packed")
        if codes is None:
            raise KnowpressError(f"integrity: {name} has no packed codes in the folder")
        bits = getattr(method, "bits", 8)
        width = packed_width(a.target.shape[-1], bits)
        if storage == "compressed-tensors":  # 32 codes in `bits` int32 words
            width = -(-a.target.shape[-1] * bits // 32)
        per_expert = getattr(method, "expert_bits", None)
        if per_expert:  # one flat buffer: every expert's rows at its own width
            out, n = a.target.shape[1], a.target.shape[2]
            flat = sum(out * packed_width(n, b) for b in per_expert)
            if codes["shape"] != [flat]:
                raise KnowpressError(
                    f"integrity: {name} stored {codes['shape']} code bytes, its experts' "
                    f"widths {per_expert} take {flat}"
                )
        elif codes["shape"][-1] != width:
            raise KnowpressError(
                f"integrity: {name} stored {codes['shape'][-1]} bytes per row, "
                f"{getattr(method, 'bits', '?')}-bit codes take {width}"
            )
        scales = header[f"{name}_scale"]["shape"]
        group = getattr(method, "group_size", None) or a.target.shape[-1]
        if scales[-1] != a.target.shape[-1] // group:
            raise KnowpressError(
                f"integrity: {name} stored with {scales[-1]} groups per row, the plan says "
                f"{a.target.shape[-1] // group}"
            )
    if abs(stored - predicted) > TOLERANCE * predicted:
        raise KnowpressError(
            f"integrity: {stored:,} bytes stored, the plan predicted {predicted:,} (more than "
            f"{TOLERANCE:.0%} apart)"
        )


def check_bits(ctx: Context, assignments: list[Assignment]) -> None:
    """Every targeted tensor is packed in memory at its planned bits."""
    from knowpress.tensors.qexperts import packed_names

    for a in assignments:
        module = ctx.model.get_submodule(a.target.module)
        planned: Any = getattr(a.method, "bits", None)
        if a.target.kind == "fused_experts":
            spec = packed_names(module).get(a.target.attribute, {})
            bits: Any = spec.get("expert_bits") or spec.get("bits")
            planned = getattr(a.method, "expert_bits", None) or planned
        else:
            bits = getattr(module, "bits", None)
        if bits != planned:
            raise KnowpressError(
                f"integrity: {a.target.name} is at {bits} bits, the plan says {planned}"
            )


@torch.inference_mode()
def check_round_trip(ctx: Context, folder: Path) -> None:
    """The reloaded folder's greedy tokens equal the in-memory model's on probe prompts."""
    from knowpress.formats.io import load_model
    from knowpress.formats.weights import packed_modules, packed_tensor_of
    from knowpress.runtimes.torch import TorchRuntime

    deploy = getattr(torch, ctx.deploy_dtype)
    packed = set(packed_modules(ctx.model))
    for key, tensor in ctx.model.state_dict().items():
        if tensor.is_floating_point() and packed_tensor_of(key, packed) is None:
            tensor.copy_(tensor.to(deploy))  # what the folder holds of the untouched tensors
    reloaded, tokenizer = load_model(folder, dtype=ctx.compute_dtype,
                                     trust_remote_code=ctx.trust_remote_code,
                                     device=ctx.device)  # fmt: skip
    prompts = probe_prompts(ctx)
    here = TorchRuntime(ctx.model, ctx.tokenizer).greedy(prompts, PROBE_TOKENS)
    there = TorchRuntime(reloaded, tokenizer).greedy(prompts, PROBE_TOKENS)
    for prompt, a, b in zip(prompts, here, there, strict=True):
        if a != b:
            raise KnowpressError(
                f"integrity: the reloaded model answers {b!r} where the quantized model "
                f"answered {a!r} (prompt {prompt[-60:]!r}); the saved folder is not what ran"
            )


def probe_prompts(ctx: Context) -> list[str]:
    """Prompts for the round trip: the world's trained questions, else held-out text starts."""
    world = ctx.world
    questions = getattr(world, "questions", None)
    if callable(questions):
        items = questions("trained")[:PROBES]
        if items:
            return [item.prompt for item in items]
    texts = list(world.heldout_texts())[:PROBES] if world is not None else []
    prompts = [" ".join(t.split()[:16]) for t in texts if t.split()]
    return prompts or ["The"]
