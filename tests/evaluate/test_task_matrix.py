"""Every registered task on a real (random) model behind nothing but the Runtime protocol.

A task that reaches past the protocol (``runtime.model`` ...) fails here, so every task can
score any runtime: torch, torch + KV policy, ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import default_entries as rows
import pytest

from knowpress.evaluate.tasks import TASKS
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama
from knowpress.worlds import WorldConfig, build_tokenizer, generate_world

WORLD = generate_world(
    WorldConfig(seed=2, n_people=6, attributes=("birth_city", "major", "employer"),
                bios_per_person=1, in_context_examples=2)
)  # fmt: skip
PROTOCOL = {"name", "tokenizer", "greedy", "nll", "next_token_logprobs", "sample",
            "max_positions", "parameter_count", "kv_bytes_per_token", "describe"}  # fmt: skip


class ProtocolOnly:
    """A runtime that answers only what the ``Runtime`` protocol declares."""

    def __init__(self, runtime: TorchRuntime) -> None:
        self._runtime = runtime
        self.asked: set[str] = set()

    def __getattr__(self, item: str) -> Any:
        if item not in PROTOCOL:
            raise AttributeError(f"a task reached past the Runtime protocol: runtime.{item}")
        self.asked.add(item)
        return getattr(self._runtime, item)


@pytest.fixture(scope="module")
def runtime() -> TorchRuntime:
    tokenizer = build_tokenizer(WORLD, model_max_length=256)
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 256
    return TorchRuntime(model, tokenizer)


@pytest.mark.parametrize("task", sorted(rows.TASKS))
def test_task_runs_on_the_runtime_protocol_alone(task: str, runtime: TorchRuntime) -> None:
    wrapped = ProtocolOnly(runtime)
    result = TASKS.get(task)(**rows.TASKS[task]).run(wrapped, WORLD, 4)  # type: ignore[arg-type]
    assert result.n > 0 and wrapped.asked & {"greedy", "nll", "next_token_logprobs"}
    again = TASKS.get(task)(**rows.TASKS[task]).run(ProtocolOnly(runtime), WORLD, 4)  # type: ignore[arg-type]
    assert (again.score, again.n, again.extra) == (result.score, result.n, result.extra)
    # compared with its own reference state, a runtime agrees with itself exactly
    itself = TASKS.get(task)().run(ProtocolOnly(runtime), WORLD, 4, result.state)  # type: ignore[arg-type]
    if not TASKS.get(task).relative:
        assert itself.score == pytest.approx(0.0, abs=1e-6) and itself.extra["top1"] == 1.0
    elif "correct" in result.state:
        assert itself.extra["flips/lost"] == itself.extra["flips/gained"] == 0.0
        assert itself.score == result.score
