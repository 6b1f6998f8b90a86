"""MoE compression: expert statistics, expert pruning methods in EXPERT_PRUNERS (one file
each), the budget that picks the experts to cut, and the redundancy pre-check."""

from knowpress.methods.experts import frequency, merge, reap, routing_weight  # noqa: F401
from knowpress.methods.experts.base import EXPERT_PRUNERS, ExpertPruner
from knowpress.methods.experts.stats import ExpertStats, expert_stats

__all__ = ["EXPERT_PRUNERS", "ExpertPruner", "ExpertStats", "expert_stats"]
