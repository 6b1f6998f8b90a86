"""``paraphrase``: the same facts as ``recall`` asked with held-out question templates that
never occur in the training text, so a model must *extract* the knowledge, not replay a
memorised string. Exact match (token F1 as extra), scored by the shared QA helper.

Allen-Zhu & Li, "Physics of Language Models 3.1" (arXiv:2309.14316): extraction from unseen
phrasings only works when the training data is augmented (several bios, permutation).
"""

from __future__ import annotations

from knowpress.evaluate.tasks.base import TASKS
from knowpress.evaluate.tasks.recall import Recall


@TASKS.register("paraphrase")
class Paraphrase(Recall):
    name = "paraphrase"
    summary = "held-out question templates, greedy answer, exact match"
    split = "heldout"
