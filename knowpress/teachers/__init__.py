"""Teachers: models trained to know a fact world (``teacher.py``: build or fetch from the
cache; ``training.py``: the training loop and its knowledge checks). Above ``evaluate``,
which they use to score what a teacher learned."""

from knowpress.teachers.teacher import build_teacher

__all__ = ["build_teacher"]
