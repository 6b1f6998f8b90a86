"""The Context: what flows from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE, CalibrationSpec

if TYPE_CHECKING:
    from knowpress.methods.kv.base import KVPolicy
    from knowpress.pipeline.recipe import Recipe
    from knowpress.worlds import World


@dataclass
class StageRecord:
    """One finished stage, as stored in its checkpoint and in report.json."""

    index: int
    kind: str
    config: dict[str, Any]
    hash: str
    seconds: float
    peak_rss_bytes: int
    bytes_before: int
    bytes_after: int
    checkpoint: str
    resumed: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    format: str = "hf"


@dataclass
class Context:
    """Typed state handed to every stage.

    ``model`` is the model being compressed (a stage may replace it), on ``device``;
    ``teacher`` the frozen model a distillation stage learns from (``recipe.teacher``,
    default the reference), loaded only for stages with ``needs_teacher``. Carried from stage
    to stage and saved in every later artifact's manifest: ``kv_policy`` (a runtime KV-cache
    policy a stage attached), ``expert_skip`` (dynamic MoE expert skipping) and
    ``structure`` (per-layer facts a loader needs, e.g. experts
    kept per layer). Fresh for each stage: ``stage_dir`` (the stage's output folder, being
    written: files a stage writes there are part of its artifact and counted in its bytes),
    ``artifacts`` (name -> file in ``stage_dir``, recorded in the manifest), ``metrics``
    (a stage's own figures, shown under its row in the report) and ``resume_dir`` (a folder
    that outlives an interrupted attempt at this very stage, its hash in the name: mid-stage
    checkpoints go there; the runner removes it once the stage is installed).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    out_dir: Path
    world: World | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: PreTrainedModel | None = None
    kv_policy: KVPolicy | None = None
    expert_skip: Any = None  # methods/experts/skip.py's ExpertSkip, a runtime policy like kv_policy
    structure: dict[str, Any] = field(default_factory=dict)
    stage_dir: Path | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[StageRecord] = field(default_factory=list)
    resume_dir: Path | None = None
    #: what a stage needs of the recipe, not the recipe: the deploy and compute dtypes, the
    #: largest weight file a save writes (bytes), whether remote code may run, the calibration
    #: text data-aware stages read
    deploy_dtype: str = "bfloat16"
    compute_dtype: str = "float32"
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    trust_remote_code: bool = False
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    @classmethod
    def for_recipe(
        cls, recipe: Recipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
        out_dir: Path, **fields: Any,
    ) -> Context:  # fmt: skip
        """A context carrying what stages need of ``recipe`` (``compute_dtype: auto``
        resolved against ``device``, as the runner resolves it)."""
        from knowpress.core.device import resolve_compute_dtype

        spec = recipe.model
        device = fields.get("device", torch.device("cpu"))
        compute = resolve_compute_dtype(spec.compute_dtype, device)
        return cls(model=model, tokenizer=tokenizer, out_dir=out_dir, deploy_dtype=spec.dtype,
                   compute_dtype=compute, max_shard_size=spec.max_shard_size,
                   trust_remote_code=spec.trust_remote_code, calibration=recipe.data.calibration,
                   **fields)  # fmt: skip

    def calibration_ids(self, max_positions: int) -> list[list[int]]:
        """Token sequences of the calibration text (``calibration.calibration_ids``)."""
        from knowpress.pipeline.calibration import calibration_ids

        return calibration_ids(self.calibration, self.world, self.tokenizer, max_positions)

    def begin_stage(self, stage_dir: Path, resume_dir: Path | None = None) -> None:
        """Reset the per-stage fields before a stage runs."""
        self.stage_dir, self.artifacts, self.metrics = stage_dir, {}, {}
        self.resume_dir = resume_dir
