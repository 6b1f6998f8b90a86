"""Built-in stage kinds; importing this package registers them in ``STAGES``."""

from knowpress.stages import distill, prune_experts, quantize  # noqa: F401
