"""How the runner holds the model for a block-wise stage (``StageConfig.blockwise``).

A stage whose calibration passes run one decoder block at a time (``arch/sequential.py``)
gets its model as stored — on the CPU, every float tensor in the dtype its safetensors hold
(the dtype most of the stored float elements have: an 8 B bf16 checkpoint stays 16 GB, not
32) — and onloads each block to the run's device in the compute dtype. Peak memory: the
stored model + one block in the compute dtype + one block's activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from knowpress.arch.sequential import Onload
    from knowpress.pipeline.context import Context

_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def stored_dtype(location: str, fallback: str) -> str:
    """The float dtype (``bfloat16 | float16 | float32``) most stored float elements of the
    folder ``location`` have; ``fallback`` for a hub id or a folder with no float tensor."""
    from knowpress.formats.sizes import read_header, safetensors_files

    folder = Path(location)
    if not folder.is_dir():
        return fallback
    counts: dict[str, int] = {}
    for file in safetensors_files(folder):
        for info in read_header(file).values():
            name = _NAMES.get(info["dtype"])
            if name is not None:
                elements = 1
                for size in info["shape"]:
                    elements *= int(size)
                counts[name] = counts.get(name, 0) + elements
    return max(counts, key=counts.__getitem__) if counts else fallback


def onload_for(ctx: Context) -> Onload:
    """Blocks onloaded to the run's device in its compute dtype; with
    ``data.calibration.offload`` the activations between blocks wait on the CPU (device
    memory: one block and one block's activations, whatever the calibration size)."""
    from knowpress.arch.sequential import Onload

    return Onload(ctx.device, getattr(torch, ctx.compute_dtype), ctx.calibration.offload)
