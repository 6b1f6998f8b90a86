"""The integrity check of a quantize stage, on the folder it is about to install.

GPTQModel and ModelOpt MoE checkpoints have shipped with experts silently left in bf16 and
layers left unquantized (Model-Optimizer#1323, GPTQModel#2271/#1680); a knowpress stage fails
instead, before anything is installed, when:

- a targeted tensor is not packed at its planned grid, bits and group size in the saved folder
  (every tensor its folder format stores for it, at its dtype and shape), or a float copy of
  it was stored beside the codes;
- the stored bytes are more than 1% off the plan's prediction;
- the model reloaded from the folder does not produce the in-memory model's greedy tokens
  (the in-memory model's untouched tensors rounded to the deploy dtype first, as stored).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from knowpress.core.errors import KnowpressError
from knowpress.formats.shards import folder_header
from knowpress.formats.sizes import one_file_bytes

if TYPE_CHECKING:
    from knowpress.formats.sizes import Entry
    from knowpress.methods.quant.plan import Assignment
    from knowpress.pipeline.context import Context

TOLERANCE = 0.01
PROBES = 8  # prompts whose greedy tokens must survive the round trip
PROBE_TOKENS = 8


def expected_entries(a: Assignment, storage: str, model_type: str = "") -> list[Entry]:
    """What the folder must hold for one planned target, in the folder format ``storage``."""
    if storage != "compressed-tensors":
        return a.method.stored_entries(a.target)
    from knowpress.formats.compressed_tensors import Item, item_entries
    from knowpress.formats.ct_layout import scheme_of

    m: Any = a.method
    n = a.target.shape[-1]
    scheme = scheme_of(m.dtype, m.bits, m.group(n), m.symmetric, n)
    if a.target.kind == "linear":
        return item_entries(Item(a.target.module, "linear", scheme, tuple(a.target.shape)))
    fused = ((a.target.attribute, scheme, tuple(a.target.shape), False),)
    return item_entries(Item(a.target.module, "fused_experts", fused=fused, model_type=model_type))


def check_folder(
    assignments: list[Assignment], folder: Path, predicted: int, storage: str = "knowpress",
    model_type: str = "",
) -> None:  # fmt: skip
    """Packed at the planned settings in the folder format ``storage`` (every tensor the plan
    stores, at its dtype and shape, in whichever shard holds it), no float copy, bytes within
    1% of ``predicted`` (the plan predicts one file: a sharded folder's tensors are sized as
    one file, ``sizes.one_file_bytes``; the shards' own headers and index are not planned)."""
    header: dict[str, Any] = folder_header(folder)
    stored = one_file_bytes(folder)
    for a in assignments:
        expected = expected_entries(a, storage, model_type)
        names = {e[0] for e in expected}
        if a.target.name in header and a.target.name not in names:
            raise KnowpressError(
                f"integrity: {a.target.name} was stored as a float tensor beside its codes"
            )
        codes = expected[0][0]
        if codes not in header:
            raise KnowpressError(f"integrity: {a.target.name} has no packed codes in the folder")
        for name, tag, shape in expected:
            _check_entry(a, header.get(name), name, tag, list(shape), name == codes)
    if abs(stored - predicted) > TOLERANCE * predicted:
        raise KnowpressError(
            f"integrity: {stored:,} bytes stored, the plan predicted {predicted:,} (more than "
            f"{TOLERANCE:.0%} apart)"
        )


def _check_entry(a: Assignment, found: dict[str, Any] | None, name: str, tag: str,
                 shape: list[int], codes: bool) -> None:  # fmt: skip
    what = f"integrity: {a.target.name}"
    if found is None:
        raise KnowpressError(f"{what}: {name} is missing from the folder")
    got, dtype = list(found["shape"]), found["dtype"]
    if got == shape and dtype == tag:
        return
    bits = getattr(a.method, "bits", "?")
    if codes and len(shape) == 1:  # one flat buffer: every expert's rows at its own width
        raise KnowpressError(
            f"{what} stored {got} code bytes, its experts' widths "
            f"{getattr(a.method, 'expert_bits', None)} take {shape}"
        )
    if codes and got[:-1] == shape[:-1] and dtype == tag:
        raise KnowpressError(
            f"{what} stored {got[-1]} bytes per row, {bits}-bit codes take {shape[-1]}"
        )
    if name.endswith("_scale") and got[:-1] == shape[:-1] and dtype == tag:
        raise KnowpressError(
            f"{what} stored with {got[-1]} groups per row, the plan says {shape[-1]}"
        )
    raise KnowpressError(f"{what}: {name} stored {dtype} {got}, the plan says {tag} {shape}")


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
            grid = spec.get("grid", "int")
        else:
            bits = getattr(module, "bits", None)
            grid = getattr(module, "grid", "int")
        wanted = getattr(a.method, "dtype", "int")
        if grid != wanted:
            raise KnowpressError(
                f"integrity: {a.target.name} holds {grid} codes, the plan says {wanted}"
            )
        if bits != planned:
            raise KnowpressError(
                f"integrity: {a.target.name} is at {bits} bits, the plan says {planned}"
            )


@torch.inference_mode()
def verify_packed(ctx: Context, folder: Path, assignments: list[Assignment], predicted: int,
                  storage: str) -> None:  # fmt: skip
    """The whole check of a packing stage's saved folder (quantize, qad): bits in memory,
    the folder's tensors and bytes, greedy tokens after a reload."""
    check_bits(ctx, assignments)
    model_type = str(getattr(ctx.model.config, "model_type", ""))
    check_folder(assignments, folder, predicted, storage, model_type)
    check_round_trip(ctx, folder)


def check_round_trip(ctx: Context, folder: Path) -> None:
    """The reloaded folder's greedy tokens equal the in-memory model's on probe prompts."""
    from knowpress.arch.sequential import Onloaded, home_device
    from knowpress.formats.io import load_model
    from knowpress.formats.weights import packed_modules, packed_tensor_of
    from knowpress.runtimes.torch import TorchRuntime

    deploy = getattr(torch, ctx.deploy_dtype)
    packed = set(packed_modules(ctx.model))
    for key, tensor in ctx.model.state_dict().items():
        if tensor.is_floating_point() and packed_tensor_of(key, packed) is None:
            tensor.copy_(tensor.to(deploy))  # what the folder holds of the untouched tensors
    prompts = probe_prompts(ctx)
    # both in the compute dtype on the device: a model held as stored (a block-wise stage) is
    # onloaded whole for its greedy tokens and restored exactly before the reload
    compute = getattr(torch, ctx.compute_dtype)
    moved = Onloaded([ctx.model], ctx.device, compute, home_device(ctx.model), ctx.model)
    try:
        here = TorchRuntime(ctx.model, ctx.tokenizer).greedy(prompts, PROBE_TOKENS)
    finally:
        moved.restore()
    reloaded, tokenizer = load_model(folder, dtype=ctx.compute_dtype,
                                     trust_remote_code=ctx.trust_remote_code,
                                     device=ctx.device)  # fmt: skip
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
