"""Decoder layers of a causal LM and their inputs, for layer-by-layer (sequential) stages.

``decoder_layers`` finds the model's stack of blocks (the ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules); ``capture_inputs`` runs the model on token batches and
keeps what the first block receives (hidden states and the keyword arguments: mask, position
embeddings), stopping there; ``run_layer`` replays a block on them. A stage can then process
block ``i`` on the outputs of the blocks before it as they are *after* their own compression
(GPTQ's sequential order) at the cost of one pass per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from knowpress.core.errors import KnowpressError


def built_with(config: Any, hook: Callable[[nn.Module], None]) -> Any:
    """The architecture's causal-LM class with ``hook(model)`` run between construction and
    weight loading, so stock ``from_pretrained`` fills what the hook left (same class name:
    same key conversions); None for a config transformers' auto mapping does not know
    (remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if base is None:
        return None

    class Hooked(base):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            hook(self)

    Hooked.__name__, Hooked.__qualname__ = base.__name__, base.__qualname__
    return Hooked


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@dataclass
class LayerInput:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module list of the model's decoder blocks."""
    count = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise KnowpressError(
        f"{type(model).__name__}: no list of {count} decoder layers found; this architecture is "
        f"not supported by layer-wise stages"
    )


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device | None = None
) -> list[LayerInput]:
    """What the first decoder block receives for each batch of token ids ``[B, T]`` (ids sent
    to ``device``, default the model's)."""
    _, layers = decoder_layers(model)
    captured: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        captured.append(LayerInput(hidden, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = device or next(model.parameters()).device
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.inference_mode()
def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """The block's outputs on each captured input, as the next block's inputs."""
    out = []
    for item in inputs:
        result = layer(item.hidden, use_cache=False, **item.kwargs)
        hidden = result[0] if isinstance(result, tuple) else result
        out.append(LayerInput(hidden, item.kwargs))
    return out
