"""FSDP2 for distillation: ``accelerate launch --use_fsdp --fsdp_version 2``.

Adapters over torch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) and its
distributed-checkpoint state dicts; the data parallelism is ``parallel.py``'s (rows
``rank::world``, every loss divided by the whole batch's token count). Under FSDP:

- the student is made whole in every process from rank 0's weights, then sharded: each
  decoder block (the model's ``_no_split_modules``) and the root get ``fully_shard``, so
  parameters, gradients and AdamW's moments are split over the processes. Gradients are
  reduce-scattered as sums (divide factor 1, sum-only collectives, which gloo serves too);
- the teacher is sharded the same way (inference only: no gradients, no optimizer state),
  unless its routers train (``moe_teacher.router_lr``: it stays whole, routers all-reduced);
- every process runs the same number of forwards (FSDP gathers each block's weights in
  every forward): a process with fewer rows than rank 0 gets copies of the batch's first
  row with no labels, which add nothing to the loss;
- checkpoints gather full state dicts on rank 0 (``get_model_state_dict`` /
  ``get_optimizer_state_dict``, ``full_state_dict``, ``cpu_offload``) and write the one-process
  file layout (``core/train_state.py``): either kind of run resumes the other's;
- the trained student comes back on rank 0 as a plain model of its class holding the
  gathered weights, so the stage saves what one process saves.

Accelerate's launcher options read here: ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``,
``FSDP_RESHARD_AFTER_FORWARD`` and ``FSDP_OFFLOAD_PARAMS`` (``CPUOffloadPolicy``, cuda only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from knowpress.core.train_state import ADAM_KEYS, TrainState, read_state, write_state
from knowpress.methods.distill.parallel import distributed


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def requested_version() -> int | None:
    """The FSDP version accelerate's launcher asked for, None without ``--use_fsdp``."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1") or "1")


def active() -> bool:
    """FSDP2 was asked for and this process is one of several in a group."""
    return requested_version() == 2 and distributed()[1] > 1


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks FSDP shards one by one (transformers' ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every block, then the root, in place; gradients summed, not averaged."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    if is_sharded(model):
        return model
    device = next(model.parameters()).device
    offload = _flag("FSDP_OFFLOAD_PARAMS") and device.type == "cuda"
    options = {
        "reshard_after_forward": _flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }
    for block in blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # each process's loss is already its share
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _full_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def plain_model(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module | None:
    """Rank 0: a plain model of the sharded ``model``'s class and config holding its
    gathered weights, on ``device``; None on the other ranks (all must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    full = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if distributed()[0] != 0:
        return None
    cls = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)  # type: ignore[call-arg]
    plain.load_state_dict(full, strict=False, assign=True)
    plain.tie_weights()
    for name, buffer in model.named_buffers():  # rotary tables: not in the state dict
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    missing = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"FSDP: the gathered state has no {missing[0]}")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.to(device).eval()


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, key: str) -> None:  # fmt: skip
    """Gather the student and AdamW's moments on rank 0, which writes the one-process
    checkpoint layout (every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _full_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if distributed()[0] != 0:
        return  # the full state dicts are rank 0's alone
    moments = optimizer_state["state"]
    tensors: dict[str, torch.Tensor] = {}
    for name, _ in model.named_parameters():
        tensors[f"param.{name}"] = weights[name].contiguous()
        for slot, value in moments.get(name, {}).items():
            if slot in ADAM_KEYS and isinstance(value, torch.Tensor):
                tensors[f"adam.{name}.{slot}"] = value.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_state(path, tensors, state, key)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    key: str) -> TrainState | None:  # fmt: skip
    """Restore a checkpoint (either layout's writer) into the sharded ``model`` and its
    optimizer: every rank reads the file and keeps its shard; None when it does not match."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    params = dict(model.named_parameters())
    read = read_state(path, key, {name: p.shape for name, p in params.items()})
    if read is None:
        return None
    state, loaded = read
    device = next(model.parameters()).device
    weights = {name: loaded[f"param.{name}"].to(device) for name in params}
    set_model_state_dict(model, weights, options=_full_options(strict=False))
    groups = get_optimizer_state_dict(model, optimizer, options=_full_options())["param_groups"]
    moments = {
        name: {f: loaded[k] if f == "step" else loaded[k].to(device)
               for f in ADAM_KEYS if (k := f"adam.{name}.{f}") in loaded}
        for name in params
    }  # fmt: skip
    moments = {name: slots for name, slots in moments.items() if slots}
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": groups},
                             options=_full_options())  # fmt: skip
    return state
