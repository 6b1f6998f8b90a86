"""Evaluation: tasks scored through a runtime, retention against the teacher, the gate."""

from knowpress.evaluate.evaluator import TaskScore, evaluate_runtime, retention_table

__all__ = ["TaskScore", "evaluate_runtime", "retention_table"]
