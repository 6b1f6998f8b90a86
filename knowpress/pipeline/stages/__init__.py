"""Built-in stage kinds; importing this package registers them in ``STAGES``."""

from knowpress.pipeline.stages import (  # noqa: F401
    compress_kv,
    distill,
    export,
    prune_experts,
    qad,
    quantize,
    recalibrate_routers,
    skip_experts,
)
