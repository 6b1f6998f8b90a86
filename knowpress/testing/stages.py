"""A test-only stage kind, registered when this module is imported (tests do; the CLI does not).

``attach_test_policy`` exercises the stage contract the runtime-policy stages build on: it
attaches a KV policy (``ctx.kv_policy``) and writes a payload file that is not part of an
HF folder into ``ctx.stage_dir``, naming it in ``ctx.artifacts``; the runner must save the
policy in the manifest, count the file in the stage's bytes, and score the artifact with the
policy applied, including after ``--resume``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from knowpress.core.progress import Progress
from knowpress.methods.kv import policy_from_json
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig

KIND = "attach_test_policy"
PAYLOAD_FILE = "policy_table.bin"


@STAGES.register(KIND)
class AttachTestPolicyConfig(StageConfig):
    summary = "test only: attach a KV policy and write a non-HF payload file"

    kind: Literal["attach_test_policy"]
    policy: dict[str, Any] = Field(default_factory=lambda: {"name": "full"})
    payload_bytes: int = Field(4096, ge=0)

    def build(self) -> AttachTestPolicy:
        return AttachTestPolicy(self)


class AttachTestPolicy:
    def __init__(self, config: AttachTestPolicyConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        assert ctx.stage_dir is not None
        ctx.kv_policy = policy_from_json(self.config.policy, "policy")
        (ctx.stage_dir / PAYLOAD_FILE).write_bytes(bytes(self.config.payload_bytes))
        ctx.artifacts["policy_table"] = PAYLOAD_FILE
        ctx.metrics["payload_bytes"] = self.config.payload_bytes
        return ctx
