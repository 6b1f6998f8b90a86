"""Evaluation of a model larger than the device: accelerate's ``device_map="auto"`` offload.

``offload(model, device)`` spreads a model loaded on the CPU over the device, the CPU and a
temporary folder on disk (``accelerate.infer_auto_device_map`` with the model's
``_no_split_modules``, then ``accelerate.dispatch_model``): modules placed on ``cpu`` or
``disk`` keep their weights there and accelerate's hooks bring them to the execution device
(the GPU, or the CPU itself) for each forward, so the outputs are the whole model's, only
slower. The folder is removed when the model is freed. Host memory still holds the whole
model while it loads (``formats.io.load_model`` loads every format on the CPU first); what
offload bounds is the device's memory, and with ``disk`` entries the host's afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

from knowpress.core.errors import KnowpressError

if TYPE_CHECKING:
    import torch


def _budget(device: torch.device) -> dict[Any, Any]:
    """What each place may hold: the device's free memory (accelerate's measure), then the
    CPU's available memory; what does not fit goes to disk."""
    from accelerate.utils import get_max_memory

    available = get_max_memory()
    if device.type == "cuda":
        index = device.index or 0
        return {index: available[index], "cpu": available["cpu"]}
    return {"cpu": available["cpu"]}


def offload(
    model: Any, device: str | torch.device, max_memory: dict[Any, Any] | None = None
) -> dict[str, Any]:
    """Dispatch ``model`` (on the CPU) over ``device``, the CPU and disk; returns the device
    map (module name -> device index, ``cpu`` or ``disk``). ``max_memory`` (place -> bytes or
    a size like ``"2GB"``) replaces the measured budget (tests force modules to disk with it)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    target = torch.device(device)
    memory = max_memory if max_memory is not None else _budget(target)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = dict(infer_auto_device_map(model, max_memory=memory,
                                            no_split_module_classes=no_split))  # fmt: skip
    if set(device_map.values()) == {"disk"}:
        raise KnowpressError(
            f"evaluate.offload: not one module of the model fits in {memory}; free memory on "
            "the device or the host, or evaluate on a larger machine"
        )
    folder = tempfile.mkdtemp(prefix="knowpress-offload-")
    main = str(target) if target.type == "cuda" else "cpu"
    try:
        dispatch_model(model, device_map=device_map, main_device=main, offload_dir=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    model.hf_device_map = device_map
    return device_map


def execution_device(model: Any) -> torch.device | None:
    """Where an offloaded model runs (the device of its first module on an accelerator, else
    the CPU); None for a model that was not dispatched."""
    import torch

    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return None
    for place in mapping.values():
        if place not in ("cpu", "disk"):
            return torch.device(place if isinstance(place, str) else f"cuda:{place}")
    return torch.device("cpu")


def placement(model: Any) -> str | None:
    """One line for reports: how many of the dispatched modules are on each place."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return None
    counts = Counter(str(p) if isinstance(p, str) else f"cuda:{p}" for p in mapping.values())
    return "device_map auto: " + ", ".join(f"{n} module(s) on {p}" for p, n in counts.items())
