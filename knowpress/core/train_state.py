"""Resumable teacher training: one safetensors file holds everything a run needs to go on.

Layout of the checkpoint file (written to a temp file, then ``os.replace``d, so it is
always whole)::

    param.{name}            every trainable parameter (tied ones once)
    adam.{name}.step        AdamW's per-parameter state, when it exists
    adam.{name}.exp_avg
    adam.{name}.exp_avg_sq
    metadata: {"preset_key", "step", "ema", "seconds", "extra" (JSON)}

The batch schedule is a pure function of the step (``training.EpochBatches``) and the
learning rate of the step (``training.lr_factor``), so a resumed run continues exactly where
the saved one stopped: its final weights equal an uninterrupted run's (tests check this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from knowpress.core.io import atomic_file

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Progress of a run: steps done, smoothed loss, training seconds so far."""

    step: int = 0
    ema: float | None = None
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)  # e.g. a distill loss's schedule


def save_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    key: str,
) -> None:
    """Write model, optimizer and ``state`` for preset ``key`` to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tensors[f"param.{name}"] = param.detach().to("cpu", copy=True)
        for slot, value in optimizer.state.get(param, {}).items():
            if slot in ADAM_KEYS and isinstance(value, torch.Tensor):
                tensors[f"adam.{name}.{slot}"] = value.detach().to("cpu", copy=True)
    write_state(path, tensors, state, key)


def write_state(path: Path, tensors: dict[str, torch.Tensor], state: TrainState, key: str) -> None:
    """The checkpoint file of ``tensors`` (``param.*`` / ``adam.*`` as above), atomically."""
    metadata = {
        "preset_key": key,
        "step": str(state.step),
        "ema": "" if state.ema is None else repr(state.ema),
        "seconds": repr(state.seconds),
        "extra": json.dumps(state.extra),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_state(
    path: Path, key: str, shapes: dict[str, torch.Size]
) -> tuple[TrainState, dict[str, torch.Tensor]] | None:
    """The state and tensors of ``path``, or ``None`` when it is absent, belongs to another
    key, or lacks a parameter of ``shapes`` (name -> shape) or holds it in another shape."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        names = set(handle.keys())
        if meta.get("preset_key") != key or {f"param.{n}" for n in shapes} - names:
            return None
        loaded = {name: handle.get_tensor(name) for name in names}
    if any(loaded[f"param.{n}"].shape != shape for n, shape in shapes.items()):
        return None
    ema = meta.get("ema", "")
    extra = json.loads(meta.get("extra") or "{}")
    state = TrainState(int(meta["step"]), float(ema) if ema else None, float(meta["seconds"]),
                       extra)  # fmt: skip
    return state, loaded


def load_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, key: str
) -> TrainState | None:
    """Restore ``path`` into ``model`` / ``optimizer``; ``None`` when it belongs to another
    preset key or does not match the model (the caller then starts from step 0)."""
    params = dict(model.named_parameters())
    read = read_state(path, key, {name: p.shape for name, p in params.items()})
    if read is None:
        return None
    state, loaded = read
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(loaded[f"param.{name}"])
    for name, param in params.items():
        moments = {
            # AdamW keeps ``step`` on the CPU unless capturable; the moments live with the param
            f: loaded[k] if f == "step" else loaded[k].to(param.device)
            for f in ADAM_KEYS
            if (k := f"adam.{name}.{f}") in loaded
        }
        if moments:
            optimizer.state[param] = moments
    return state
