"""Stages: the unit a recipe chains.

A stage kind is a frozen pydantic config (``StageConfig`` subclass with ``kind:
Literal["..."]``) registered in :data:`STAGES`; ``config.build()`` returns the object whose
``run(ctx, progress)`` transforms the :class:`~knowpress.pipeline.context.Context`. A stage
may change the weights, the architecture, replace the model (a student), attach a runtime policy or
produce an artifact; the runner checkpoints all of these the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from knowpress.core.config import FrozenConfig
from knowpress.core.registry import Registry

if TYPE_CHECKING:
    from knowpress.core.progress import Progress
    from knowpress.pipeline.context import Context


class StageConfig(FrozenConfig):
    """Base of every stage config; ``kind`` is the YAML discriminator."""

    kind: str
    #: the runner loads the teacher into ``ctx.teacher`` only for stages that need it
    needs_teacher: ClassVar[bool] = False
    #: stage order: a stage that trains or slices float weights cannot follow one that
    #: packs them
    trains_weights: ClassVar[bool] = False
    packs_weights: ClassVar[bool] = False
    #: under ``accelerate launch`` every process runs this stage (``knowpress/pipeline/launch.py``)
    data_parallel: ClassVar[bool] = False
    #: its calibration passes run one decoder block on the device at a time: the runner
    #: hands it the model as stored, on the CPU (``pipeline/blockwise.py``)
    blockwise: ClassVar[bool] = False
    #: writes a non-PyTorch artifact (ONNX) no later stage can load: only last in a recipe;
    #: its stage object's ``save(ctx, folder) -> format`` replaces the runner's model save
    final: ClassVar[bool] = False

    def build(self) -> Stage:
        raise NotImplementedError(f"stage kind {self.kind!r} does not implement build()")

    def structure_after(self, model: Any) -> Any:
        """The model's structure (meta device) after this stage, for the checks of the
        stages after it; the default: unchanged. A stage that replaces the model (a smaller
        student) returns the new one's."""
        return model

    def uneven_structure(self) -> bool:
        """True when the result needs knowpress's loader (per-layer shapes in the manifest)."""
        return False

    def sources(self) -> dict[str, Any]:
        """Models this stage loads besides the run's (``field -> ModelSpec``, e.g. Delta-KD's
        ``loss.teacher_base``): resolved, checked and compared with the model's vocabulary
        before the first write (``preflight.check_inputs``). The default: none."""
        return {}

    def loads_teacher(self) -> bool:
        """Whether the runner loads the teacher into ``ctx.teacher`` for this stage: a kind
        that ``needs_teacher`` (checked against it before the first write) unless its settings
        say otherwise (distill's ``teacher_cache.read_only``)."""
        return type(self).needs_teacher

    def check_teacher(self, model: Any, teacher: Any) -> None:
        """For a stage that ``needs_teacher``: what can fail against the teacher's structure
        (meta device) and the model's, before any work; raise ``KnowpressError``."""

    def attaches(self) -> dict[str, Any]:
        """Runtime policies this stage attaches (slot -> policy: ``kv_policy``,
        ``expert_skip``), carried into every later artifact. The default: none."""
        return {}

    def check_runtime(self, attached: dict[str, Any], model: Any) -> None:
        """What can fail against the runtime policies the artifact carries when this stage
        runs (``attached``: slot -> policy), before any work. The default checks nothing."""

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        """Resolve what can fail against the model's structure alone (``model`` may live on
        the meta device: shapes, no weights) before any work; raise ``KnowpressError`` with
        the fix, or return lines for the dry-run plan. The default checks nothing."""
        return []


class Stage(Protocol):
    """``run`` transforms the context. A stage may also define ``verify(ctx, folder)``: the
    runner calls it on the saved folder before installing it, and a ``KnowpressError`` there
    fails the stage with nothing installed (the quantize stage's integrity check)."""

    config: StageConfig

    def run(self, ctx: Context, progress: Progress) -> Context: ...


STAGES: Registry[type[StageConfig]] = Registry("stage kind")
