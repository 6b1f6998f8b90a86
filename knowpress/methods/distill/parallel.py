"""Data parallelism inside a torch.distributed group (``accelerate launch``, torchrun).

Every process sees the same batch; process ``r`` of ``W`` trains on rows ``r::W``. Each
divides its loss by the token count of the whole batch (all-reduced), so the summed
gradients equal one process's on the whole batch and the optimizer steps stay identical
everywhere. Under FSDP (``fsdp.py``) the models are sharded and FSDP sums the student's
gradients itself. Without a group everything here is a no-op.
"""

from __future__ import annotations

import torch

from knowpress.methods.distill.batches import Batch


def distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: Batch, even: bool = False) -> tuple[Batch, torch.Tensor | None, list[int]]:
    """This process's rows (``rank::world``) of ``(ids, mask, labels)``, the token count of
    the whole batch, which every process divides by, and the rows' indices in the batch;
    ``(batch, None, all rows)`` alone. ``even`` (FSDP: every process must run as many
    forwards): a process with fewer rows than rank 0 gets copies of row 0 without labels."""
    rank, world = distributed()
    rows = list(range(batch[0].shape[0]))
    if world == 1:
        return batch, None, rows
    import torch.distributed as dist

    mine = rows[rank::world]
    if even:
        mine += [0] * (len(rows[0::world]) - len(mine))
    index = torch.tensor(mine, dtype=torch.long, device=batch[0].device)
    ids, mask, labels = (t.index_select(0, index) for t in batch)
    if even:
        labels[len(rows[rank::world]) :] = -100  # padding rows: nothing to learn
    local = (labels[:, 1:] != -100).sum().to(torch.float32)
    dist.all_reduce(local)
    return (ids, mask, labels), local.clamp_min(1), mine


def all_reduce_grads(models: list[torch.nn.Module], value: torch.Tensor) -> torch.Tensor:
    """Sum gradients and the loss over processes (each already divided by the global count)."""
    _, world = distributed()
    if world == 1:
        return value
    import torch.distributed as dist

    params = [p for model in models for p in model.parameters() if p.requires_grad]
    # a parameter with a gradient on some process (one without rows of a batch has none)
    # is summed everywhere; one no process touched keeps no gradient, as in one process
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=value.device)  # fmt: skip
    dist.all_reduce(has)
    for p, used in zip(params, has.tolist(), strict=True):
        if used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    dist.all_reduce(value)
    return value


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere: students made on each process (pruning
    ranks on calibration data) start bit-identical even if a kernel is not deterministic."""
    _, world = distributed()
    if world == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
