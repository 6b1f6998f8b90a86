"""The reference's task states on disk (``reference/states.safetensors``): what later rows
are compared with (kl's reference distributions, each QA task's per-item correctness)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowpress.core.io import atomic_file

STATES_FILE = "states.safetensors"


def write_states(path: Path, states: dict[str, Any]) -> None:
    """Task states (task -> name -> tensor) as one safetensors file, ``task/name`` keys."""
    from safetensors.torch import save_file

    flat = {
        f"{task}/{key}": t.contiguous()
        for task, state in states.items()
        for key, t in state.items()
    }
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": "pt", "tasks": ",".join(sorted(states))})


def read_states(path: Path) -> dict[str, Any] | None:
    """Inverse of :func:`write_states`; None when the file is absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    states: dict[str, Any] = {}
    for key, tensor in flat.items():
        task, _, name = key.partition("/")
        states.setdefault(task, {})[name] = tensor
    return states
