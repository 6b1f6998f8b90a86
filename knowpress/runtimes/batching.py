"""``evaluate.batch_size: auto``: the batch size scoring uses, picked once per run.

On cuda it is probed: one scoring pass (``TorchRuntime.score_probe``: the forward, its
logits upcast and log-softmaxed as scoring does) over ``AUTO_CAP`` sequences of the longest
length the tasks run, halved on ``torch.cuda.OutOfMemoryError`` until it fits; not even one
sequence fitting is one line. On the CPU nothing is tried (a too-large batch would swap, not
fail): the size is what ``CPU_SHARE`` of the memory ``psutil`` reports available holds, at an
estimate of one sequence's scoring memory (``row_bytes``), capped at ``AUTO_CAP`` (the fixed
default before ``auto``). Other runtimes (onnxruntime, GGUF) are not probed: ``AUTO_CAP``.
Every choice comes with one line saying how it was made, for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from knowpress.core.errors import KnowpressError

AUTO_CAP = 64  # the largest batch auto picks (the fixed default it replaces)
CPU_SHARE = 0.5  # of the available host memory a CPU batch may take
GIB = 2**30


@dataclass(frozen=True)
class BatchChoice:
    size: int
    how: str  # one line for the report


def row_bytes(config: Any, length: int, itemsize: int) -> int:
    """An estimate of one sequence's peak scoring memory: its logits in the compute dtype, their
    float32 copy and log-softmax, plus one layer's activations (attention scores per head,
    MLP intermediates, a few hidden-state copies)."""
    vocab, hidden = config.vocab_size, config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    logits = length * vocab * (itemsize + 8)
    layer = heads * length * length * (itemsize + 4) + length * (3 * inter + 8 * hidden) * itemsize
    return logits + layer


def halve_until_fits(start: int, attempt: Callable[[int], None]) -> int:
    """The largest of ``start``, ``start // 2``, ... for which ``attempt(size)`` does not raise
    ``torch.cuda.OutOfMemoryError``; 0 when not even 1 fits."""
    import torch

    size = start
    while size >= 1:
        try:
            attempt(size)
            return size
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    return 0


def pick_batch_size(runtime: Any, length: int, cap: int = AUTO_CAP) -> BatchChoice:
    """The batch size ``runtime`` scores ``length``-token sequences in (see module doc)."""
    import torch

    from knowpress.runtimes.torch import TorchRuntime, _device

    if not isinstance(runtime, TorchRuntime):
        return BatchChoice(cap, f"auto: {cap}, the default ({runtime.name} runtime, not probed)")
    device = _device(runtime.model)
    if device.type == "cuda":
        size = halve_until_fits(cap, lambda rows: runtime.score_probe(rows, length))
        if size == 0:
            raise KnowpressError(
                f"evaluate.batch_size: not even one sequence of {length} tokens fits on "
                f"{device}; set evaluate.offload: true (or a smaller model.compute_dtype)"
            )
        torch.cuda.empty_cache()
        how = f"auto: {size}, the largest of {cap}, {cap // 2}, ... that scored {length} tokens"
        return BatchChoice(size, f"{how} on {device} without running out of memory")
    import psutil

    config = runtime.model.config.get_text_config(decoder=True)
    per_row = row_bytes(config, length, runtime.model.dtype.itemsize)
    available = psutil.virtual_memory().available
    size = max(1, min(cap, int(CPU_SHARE * available // per_row)))
    return BatchChoice(size, f"auto: {size} on cpu, ~{per_row / 2**20:.1f} MiB a sequence of "
                             f"{length} tokens in {CPU_SHARE:.0%} of {available / GIB:.1f} GiB "
                             f"available (at most {cap})")  # fmt: skip
