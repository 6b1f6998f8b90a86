"""Multi-process ``compress apply`` under ``accelerate launch`` (or torchrun)::

    accelerate launch --multi_gpu --num_processes 2 -m knowpress.cli apply recipe.yaml -o OUT

(``--multi_gpu`` is accelerate's torchrun launcher; on a machine without CUDA the processes
join a gloo group on the CPU, with CUDA an NCCL group, one GPU per process.)

Rank 0 runs the recipe as one process does: it owns OUT, runs and saves every stage, scores
every row and writes the report. Before it runs a stage that trains data-parallel
(``StageConfig.data_parallel``: distill) it broadcasts the stage's index, input folder and
checkpoint folder; every other rank loads that input, the teacher and the world the same
way, builds the same stage, joins its collectives (``methods/distill/parallel.py``: rows
``rank::world``, summed gradients) and drops its copy. When rank 0 ends outside such a stage,
finished or failed, it broadcasts ``stop``; a failure inside one ends rank 0's process and
the launcher stops the rest. One node, one file system: followers read rank 0's folders.

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m knowpress.cli apply ...

runs the same way, but a distill stage shards its student and teacher with FSDP2
(``methods/distill/fsdp.py``: parameters, gradients and AdamW's moments split over the
processes) and gathers the trained student on rank 0, which saves it as one process does.
FSDP version 1 and DeepSpeed are refused in one line. Across nodes, or when the teacher does
not fit beside the student, write the teacher's top-k logits once (``teacher_cache``) and
train from them: the cache files are per batch row, read by any number of processes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError

WAIT_HOURS = 24.0  # the longest a follower waits for rank 0 ($KNOWPRESS_LAUNCH_WAIT_HOURS)


def launched_world() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Group:
    """This process's place in a launched run: ``rank`` 0 leads, the others follow."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.inside = False  # True while a data-parallel stage runs (no stop message then)

    def _send(self, message: dict[str, Any] | None) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([json.dumps(message)], src=0)

    def _receive(self) -> dict[str, Any] | None:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return json.loads(box[0])

    @contextmanager
    def stage(self, index: int, input_dir: str, resume: Path) -> Iterator[None]:
        """Rank 0: announce stage ``index`` to the followers, then run it with them."""
        self._send({"index": index, "input": input_dir, "resume": str(resume)})
        self.inside = True
        yield
        self.inside = False

    def close(self) -> None:
        """Rank 0: tell the followers to stop (unless a data-parallel stage failed midway:
        they are blocked in its collectives, and the launcher ends them)."""
        import torch.distributed as dist

        if not self.inside:
            self._send(None)
            dist.destroy_process_group()

    def follow(self, recipe: Any, out_dir: Path) -> None:
        """Ranks > 0: run every announced stage's share until rank 0 says stop."""
        import torch.distributed as dist

        from knowpress.core.progress import Progress
        from knowpress.pipeline.runner import Runner

        runner, world = None, None
        while (message := self._receive()) is not None:
            if runner is None:  # rank 0 has built and checked everything by now
                runner = Runner(recipe, out_dir, resume=False, force=False,
                                progress=Progress(enabled=False))  # fmt: skip
                _, world = runner.prepare()
            ctx = runner.context(message["input"], world, [], None)
            config = recipe.stages[message["index"]]
            ctx.teacher = runner.teacher() if config.loads_teacher() else None
            with tempfile.TemporaryDirectory(prefix=f"knowpress-rank{self.rank}-") as tmp:
                ctx.begin_stage(Path(tmp), Path(message["resume"]))
                config.build().run(ctx, Progress(enabled=False))
            del ctx
        dist.destroy_process_group()


def join(recipe: Any) -> Group | None:
    """The process group of a launched run (None for one process), after checking the launch
    asks for what knowpress does: data parallelism, or FSDP2 (``--fsdp_version 2``)."""
    world = launched_world()
    if world == 1:
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise KnowpressError(
            "accelerate launch: DeepSpeed is not supported; launch with --multi_gpu "
            "(data-parallel) or --use_fsdp --fsdp_version 2 (sharded)"
        )
    from knowpress.methods.distill.fsdp import requested_version

    version = requested_version()
    if version not in (None, 2):
        raise KnowpressError(
            f"accelerate launch: FSDP version {version} is not supported; knowpress shards "
            "with FSDP2 (fully_shard): add --fsdp_version 2"
        )
    from datetime import timedelta

    import torch
    from accelerate import PartialState
    from accelerate.utils import InitProcessGroupKwargs

    # followers wait in a broadcast while rank 0 scores rows and runs the other stages: the
    # group's default timeout (NCCL 10 min) would end a long run, so wait up to WAIT_HOURS
    hours = float(os.environ.get("KNOWPRESS_LAUNCH_WAIT_HOURS", WAIT_HOURS))
    wait = InitProcessGroupKwargs(timeout=timedelta(hours=hours)).to_kwargs()
    # accelerate joins a CPU (gloo) group only when told cpu=True
    cpu = str(recipe.device) == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, **wait)
    if state.num_processes != world:
        raise KnowpressError(
            f"accelerate launch: {world} processes were started but {state.num_processes} "
            "joined the group; launch with --multi_gpu --num_processes N"
        )
    return Group(state.process_index, state.num_processes)


def rank_device(device: str) -> str:
    """``cuda`` (or ``auto`` on a CUDA machine) names this process's own GPU when launched."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return f"cuda:{local}" if launched_world() > 1 and wants_cuda else device
