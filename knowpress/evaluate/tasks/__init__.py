"""Knowledge tasks. Each is registered in ``TASKS`` and reported separately."""

from knowpress.evaluate.tasks import perplexity, recall  # noqa: F401  (register)
from knowpress.evaluate.tasks.base import TASKS, Task, TaskResult, pick

__all__ = ["TASKS", "Task", "TaskResult", "pick"]
