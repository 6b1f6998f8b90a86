"""Knowledge tasks. Each is registered in ``TASKS`` and reported separately."""

from knowpress.evaluate.tasks import bits, long_context, paraphrase, perplexity, recall, two_hop  # noqa: F401  (register)
from knowpress.evaluate.tasks.base import TASKS, Task, TaskResult, pick

__all__ = ["TASKS", "Task", "TaskResult", "pick"]
