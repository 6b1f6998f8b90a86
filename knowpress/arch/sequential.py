"""Block-wise execution: one decoder block on the device at a time (sequential onloading).

In the spirit of llm-compressor's sequential pipeline. The model stays where it is stored
(the CPU, in the dtype its checkpoint holds); the trunk before the blocks (embedding, rotary
tables) runs once on the calibration batches; then each decoder block ``i`` is onloaded —
moved to ``device`` with its float tensors cast to the compute ``dtype`` — handed to the
caller (who registers hooks, runs it, and may change it: GPTQ's Hessians and solve, expert
statistics, router fits), run again when it changed so the next block sees its outputs *after*
compression, and offloaded back: every tensor it had returns to its own device and dtype
(bit-exact: a bf16 weight cast to float32 and back is unchanged), modules the caller put in
its place go to the storage device as built. Peak memory: the stored model + one block in the
compute dtype + one block's activations (``offload_activations`` keeps those on the CPU
between blocks). Solver math (Hessians) is the caller's and stays float32.

``tail_logits`` runs the final norm and the output head on the last block's outputs, for
passes that need logits (the expert pre-check: ``sequential_log_probs``) or head inputs (GPTQ
on an untied head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from knowpress.arch.layers import LayerInput, capture_inputs, decoder_layers, run_layer
from knowpress.core.errors import KnowpressError
from knowpress.core.measure import release_memory
from knowpress.core.pages import MappedStorages


def _move(item: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors inside ``item`` (tuples, dicts) on ``device``; floating ones cast to ``dtype``."""
    if isinstance(item, torch.Tensor):
        cast = dtype if dtype is not None and item.is_floating_point() else None
        return item.to(device=device, dtype=cast)
    if isinstance(item, tuple):
        return tuple(_move(x, device, dtype) for x in item)
    if isinstance(item, dict):
        return {k: _move(v, device, dtype) for k, v in item.items()}
    return item


@dataclass(frozen=True)
class Onload:
    """Where block-wise passes run: ``device``, floating parameters cast to ``dtype`` (None:
    as stored), activations kept on the CPU between blocks when ``offload_activations``."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    offload_activations: bool = False


class Onloaded:
    """Modules moved to ``device``, floating parameters cast to ``dtype`` (buffers keep
    theirs: rotary tables, packed scales); :meth:`restore` puts back every tensor they had
    (same object, same device and dtype) and moves tensors added since to ``home``. Then the
    pages of the file-mapped storages they held and no longer hold (a weight a stage
    replaced, one cast back into a new copy) leave RSS (``core/pages.py``); ``model``: the
    whole model, whose live tensors keep their pages."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device,
                 dtype: torch.dtype | None, home: torch.device,
                 model: nn.Module | None = None) -> None:  # fmt: skip
        self.modules, self.home, self.model = list(modules), home, model
        self.mapped = MappedStorages(_tensors(self.modules))
        # by id, holding the tensor (an id freed meanwhile may be reused by a new tensor) and
        # its data, given back unless the stage changed its values: no second copy
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        params = {id(p) for m in self.modules for p in m.parameters()}
        for tensor in _tensors(self.modules):  # tied tensors once
            self.saved[id(tensor)] = (tensor, tensor.data)
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            cast = cast if id(tensor) in params else None
            tensor.data = tensor.data.to(device=device, dtype=cast)

    def restore(self) -> None:
        for tensor in _tensors(self.modules):
            same, data = self.saved.get(id(tensor), (None, None))
            if same is not tensor or data is None:  # added since: sent home as built
                if tensor.device != self.home:
                    tensor.data = tensor.data.to(self.home)
                continue
            current = tensor.data
            if current.data_ptr() == data.data_ptr() and current.dtype == data.dtype:
                continue  # never moved (a buffer already on the device, in its dtype)
            # unchanged (compared in the dtype the stage saw): the original, exactly as held;
            # one transfer home either way, as a plain cast back would take
            back = current.to(data.device)
            unchanged = back.shape == data.shape and torch.equal(back, data.to(back.dtype))
            tensor.data = data if unchanged else back.to(data.dtype)
        self.saved.clear()
        live = self.modules if self.model is None else [self.model]
        self.mapped.release(_tensors(live))


def _tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@dataclass
class BlockStep:
    """Block ``index`` onloaded, with its inputs (one ``LayerInput`` per batch). ``run`` runs
    it (hooks fire) and returns its outputs; set ``changed`` after altering the block so the
    pass runs it again for the next block's inputs."""

    index: int
    name: str
    layer: nn.Module
    inputs: list[LayerInput]
    changed: bool = False
    outputs: list[LayerInput] | None = field(default=None, repr=False)

    def run(self) -> list[LayerInput]:
        self.outputs = run_layer(self.layer, self.inputs)
        return self.outputs


def _trunk(model: nn.Module, prefix: str) -> list[nn.Module]:
    """Modules outside the decoder blocks that hold tensors (embedding, rotary, norm, head)."""
    found = []
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            found.append(module)
    return found


@contextlib.contextmanager
def onloaded_trunk(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None
) -> Iterator[None]:
    """Modules outside the decoder blocks onloaded when first called (a pre-hook), so only
    those the forward runs take device memory (the embedding, not the head), all restored
    after."""
    prefix, _ = decoder_layers(model)
    home = home_device(model)
    moved: list[Onloaded] = []

    def onload(module: nn.Module, _args: Any) -> None:
        if not any(module in item.modules for item in moved):
            moved.append(Onloaded([module], device, dtype, home, model))

    handles = [m.register_forward_pre_hook(onload) for m in _trunk(model, prefix)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for item in reversed(moved):
            item.restore()


def home_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def embed(model: nn.Module, batches: Sequence[torch.Tensor], onload: Onload) -> list[LayerInput]:
    """What the first decoder block receives for each ``[B, T]`` batch, computed with the
    trunk onloaded (the blocks never run)."""
    with onloaded_trunk(model, onload.device, onload.dtype):
        return capture_inputs(model, batches, onload.device)


def blocks(
    model: nn.Module, batches: Sequence[torch.Tensor], onload: Onload,
    final: list[LayerInput] | None = None,
) -> Iterator[BlockStep]:  # fmt: skip
    """Yield each decoder block onloaded with its inputs (module docstring). When the caller
    resumes, the block's outputs (re-run if ``changed`` or never run) become the next inputs
    and the block is offloaded. ``final``, when given, receives the last block's outputs."""
    prefix, layers = decoder_layers(model)
    home = home_device(model)
    device = onload.device
    inputs = embed(model, batches, onload)
    keep = torch.device("cpu") if onload.offload_activations else device
    for index, layer in enumerate(layers):
        onloaded = Onloaded([layer], device, onload.dtype, home, model)
        try:
            staged = [LayerInput(_move(x.hidden, device), _move(x.kwargs, device)) for x in inputs]
            step = BlockStep(index, f"{prefix}.{index}", layer, staged)
            yield step
            outputs = step.run() if step.changed or step.outputs is None else step.outputs
            inputs = [LayerInput(_move(x.hidden, keep), _move(x.kwargs, keep)) for x in outputs]
            del step, staged, outputs
        finally:
            onloaded.restore()
            release_memory()  # the block's compute-dtype copies, back to the OS
    if final is not None:
        final.extend(inputs)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last block and the head (``<prefix parent>.norm``), if any."""
    prefix, _ = decoder_layers(model)
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    with contextlib.suppress(AttributeError):
        return model.get_submodule(f"{parent}.norm" if parent else "norm")
    return None


def tail_logits(
    model: nn.Module, hidden: Sequence[LayerInput], onload: Onload
) -> Iterator[torch.Tensor]:
    """Logits ``[B, T, V]`` (float32, on the device) of each batch in turn from the last
    block's outputs, the final norm and the output head onloaded meanwhile."""
    norm, head = final_norm(model), model.get_output_embeddings()
    if norm is None or head is None:
        raise KnowpressError(f"{type(model).__name__}: no final norm / output head found")
    moved = Onloaded([norm, head], onload.device, onload.dtype, home_device(model), model)
    try:
        for item in hidden:
            with torch.inference_mode():
                logits = head(norm(item.hidden.to(onload.device))).float()
            yield logits
    finally:
        moved.restore()


def sequential_log_probs(model: nn.Module, batches: Sequence[torch.Tensor],
                      onload: Onload) -> list[torch.Tensor]:  # fmt: skip
    """The model's log-probabilities ``[B, T, V]`` (float32, CPU) on ``batches``, one block
    on the device at a time."""
    final: list[LayerInput] = []
    for _ in blocks(model, batches, onload, final):
        pass
    return [logits.log_softmax(-1).cpu() for logits in tail_logits(model, final, onload)]


def moe_inputs(
    model: nn.Module, batches: Sequence[torch.Tensor], onload: Onload
) -> Iterator[tuple[int, Any, list[torch.Tensor], BlockStep]]:
    """For each routed-expert block, in order: its index in ``moe_blocks``, the block (its
    tensors onloaded), its float inputs ``[n_b, H]`` for each batch and the decoder step
    holding it (set ``step.changed`` after changing the block: later blocks then see it)."""
    from knowpress.arch.moe import moe_blocks

    by_layer = {b.layer: (i, b) for i, b in enumerate(moe_blocks(model))}
    for step in blocks(model, batches, onload):
        if step.index not in by_layer:
            continue
        index, block = by_layer[step.index]
        seen: list[torch.Tensor] = []

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 seen: list[torch.Tensor] = seen) -> None:  # fmt: skip
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())

        handle = block.block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            step.run()
        finally:
            handle.remove()
        yield index, block, seen, step
