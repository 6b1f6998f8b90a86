"""An offline teacher-logit cache: the teacher runs once per dataset batch, ever.

Dataset batches are a pure function of (data, seed, step) (``data.py``), so the teacher's
next-token distributions can be stored once and reused by every later distill run with the
same teacher, data and batch settings: the top ``k`` log-probabilities per token (at the
loss's temperature) and one tail bucket holding the rest of the mass, per batch row::

    indices  [T, k]  int32      top-k token ids of the teacher
    logprobs [T, k+1] float16   log p of those ids, then log(1 − Σ top-k p)

One file per row of a step's batch (``step-{n:07d}/row-{r:05d}.safetensors``) under the cache
folder; its metadata holds the hash of the row's token ids, ``k`` and the temperature, and a
file whose hash or settings differ from the row being trained is recomputed, never used.
Files are per row, not per process, so a cache written by one run serves a run with any
number of processes (each reads its rows ``rank::world``): one job writes the cache (the
teacher on its own machines, FSDP-sharded if need be), the training job reads it — the
multi-node path; with ``read_only`` the training job does not even load the teacher, and a
row missing from the cache is an error. A divergence is then taken over the ``k+1`` bins,
the student's distribution collapsed into the same bins (its log-probs at the teacher's
top-k ids, and the log of the rest); with ``k = V − 1`` that is the full distribution.
Losses that need whole logits (TAID's logit interpolation, Delta-KD, CE) cannot use the
cache; on-policy batches are scored by the live teacher.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file

from knowpress.core.config import FrozenConfig
from knowpress.core.io import atomic_file

TINY = 1e-12


class TeacherCacheSpec(FrozenConfig):
    path: str = Field(description="folder of the cache (created; reused across runs)")
    top_k: int = Field(64, ge=1, description="teacher log-probs kept per token, plus a tail bucket")
    read_only: bool = Field(
        False, description="every step from the cache, written by an earlier run: no teacher"
    )


def check_cache_path(spec: TeacherCacheSpec) -> str | None:
    """Why the cache cannot live at ``spec.path`` (a file there, or a file on the way), or
    None: the folder is created when the first step is cached."""
    path = Path(spec.path).expanduser()
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"goes through the file {part}"
            return f"teacher_cache.path: {spec.path} {what}; give a folder for the cache"
        if part.is_dir():
            return None
    return None


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


def bin_teacher(
    logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [.., k], logprobs [.., k+1])`` of ``[.., V]`` logits."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = (1 - top.exp().sum(-1, keepdim=True)).clamp_min(TINY).log()
    return indices, torch.cat([top, rest], dim=-1)


def bin_student(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's log-probs ``[.., k+1]`` over the teacher's bins (top-k ids, the rest)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, indices.long())
    rest = (1 - picked.exp().sum(-1, keepdim=True)).clamp_min(TINY).log()
    return torch.cat([picked, rest], dim=-1)


class TeacherCache:
    def __init__(self, spec: TeacherCacheSpec, temperature: float) -> None:
        self.folder, self.k = Path(spec.path).expanduser(), spec.top_k
        self.temperature = temperature
        self.hits = self.misses = 0

    def _file(self, step: int, row: int) -> Path:
        return self.folder / f"step-{step:07d}" / f"row-{row:05d}.safetensors"

    def _meta(self, ids: torch.Tensor) -> dict[str, str]:
        return {"ids": _digest(ids), "k": str(self.k), "temperature": repr(self.temperature)}

    def _read(self, path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}) != self._meta(ids):
                    return None
                return handle.get_tensor("indices"), handle.get_tensor("logprobs")
        except Exception:  # a torn or foreign file is recomputed, not used
            return None

    def get(self, step: int, rows: list[int], ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """The bins of ``ids`` (batch ``rows`` of ``step``), when every row's file matches."""
        found = []
        for row, row_ids in zip(rows, ids, strict=True):
            hit = self._read(self._file(step, row), row_ids)
            if hit is None:
                return None
            found.append(hit)
        self.hits += 1
        indices, logprobs = (torch.stack(parts) for parts in zip(*found, strict=True))
        return indices.to(ids.device), logprobs.to(ids.device).float()

    def put(
        self, step: int, rows: list[int], ids: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices, logprobs = bin_teacher(logits, self.k, self.temperature)
        self.misses += 1
        stored = indices.to(torch.int32).cpu(), logprobs.to(torch.float16).cpu()
        written: set[int] = set()
        for i, row in enumerate(rows):
            if row in written:  # a padding copy of a row (FSDP)
                continue
            written.add(row)
            path = self._file(step, row)
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"indices": stored[0][i].contiguous(), "logprobs": stored[1][i].contiguous()}
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata=self._meta(ids[i]))
        return indices, logprobs.to(torch.float16).float()  # what a later hit will read
