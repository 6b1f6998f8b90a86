"""Shared by the benchmark scripts: score a model folder against a teacher by knowpress's
evaluation (per-task retention, worst gated task, KL, top-1, flips, stored bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowpress.evaluate.evaluator import evaluate_reference, evaluate_runtime, retention_table
from knowpress.formats.sizes import bf16_bytes
from knowpress.runtimes.loader import load_runtime
from knowpress.teachers.training import teacher_tasks
from knowpress.worlds import load_world


class Scorer:
    """The teacher's scores and states, and how to score a quantized model against them."""

    def __init__(self, path: Path, max_items: int | None) -> None:
        self.path, self.max_items = path, max_items
        self.world = load_world(path)
        self.tasks = [*teacher_tasks(self.world), "kl"]
        self.teacher, self.states = evaluate_reference(
            load_runtime(path), self.world, self.tasks, max_items
        )
        self.gated = [t for t, s in self.teacher.items()
                      if s.relative and not s.near_chance and s.score > 0]  # fmt: skip
        self.bf16 = bf16_bytes(path)

    def score(self, folder: Path, stored: int, seconds: float, **fields: Any) -> dict[str, Any]:
        runtime = load_runtime(folder)
        scores = evaluate_runtime(runtime, self.world, self.tasks, self.max_items, None,
                                  self.states)  # fmt: skip
        retention = retention_table(scores, self.teacher)
        return {
            **fields, "seconds": round(seconds, 3), "stored_bytes": stored,
            "size_vs_bf16_teacher": stored / self.bf16,
            "retention": retention, "worst_retention": min(retention[t] for t in self.gated),
            "scores": {t: s.score for t, s in scores.items()},
            "kl": scores["kl"].score, "top1": scores["kl"].extra["top1"],
            "flips_lost": {t: s.extra["flips/lost"] for t, s in scores.items()
                           if "flips/lost" in s.extra},
        }  # fmt: skip
