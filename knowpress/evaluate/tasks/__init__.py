"""Knowledge tasks. Each is registered in ``TASKS`` and reported separately."""

from knowpress.evaluate.tasks import (  # noqa: F401  (register)
    bits,
    kl,
    long_context,
    paraphrase,
    perplexity,
    recall,
    two_hop,
)
from knowpress.evaluate.tasks.base import TASKS, Task, TaskResult, pick

__all__ = ["TASKS", "Task", "TaskResult", "pick"]
