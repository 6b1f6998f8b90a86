"""``kind: distill`` — train a student against the frozen teacher.

The student is made from the current model (the input model for a first stage; the teacher
by default is the reference): a copy (healing), a smaller config, or a depth- or
width-pruned copy (``methods/distill/students.py``). It trains on the fact world's training
text (``pipeline/distill_data.py``; ``data.calibration`` texts without a world) with a loss
from ``DISTILL_LOSSES`` (``methods/distill/losses.py``, TAID in ``methods/distill/taid.py``),
optionally mixed with cross-entropy (``sft_weight``) and with on-policy batches
(``on_policy``: GKD; ``source: teacher``: sequence-level KD). Training is resumable
mid-stage (``methods/distill/trainer.py``). Under ``accelerate launch --use_fsdp
--fsdp_version 2`` the student and the teacher are sharded (``methods/distill/fsdp.py``).
``teacher_cache: {path, read_only: true}`` trains from a cache an earlier run wrote,
without loading the teacher (the multi-node path).
The student is saved as an ordinary transformers checkpoint of its own config.

```yaml
- kind: distill
  student: {make: width, mlp_keep: 0.5, heads_keep: 0.5}   # copy | config | depth | width
  loss: {name: taid, temperature: 1.0}                      # any DISTILL_LOSSES entry
  sft_weight: 0.0
  on_policy: {rate: 0.5, max_new_tokens: 24}                # optional (GKD)
  moe_teacher: {augment: 4, router_lr: 1e-4}                # optional, MoE teachers only
  train: {steps: 500, batch_size: 32, lr: 1e-3, checkpoint_every: 50}
```
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from knowpress.core.errors import KnowpressError, error_summary
from knowpress.core.progress import Progress
from knowpress.formats.sizes import parameter_count
from knowpress.formats.weights import packed_modules
from knowpress.methods.distill import DISTILL_LOSSES, fsdp
from knowpress.methods.distill.logit_cache import TeacherCacheSpec, check_cache_path
from knowpress.methods.distill.losses import ForwardKL
from knowpress.methods.distill.moe_teacher import MoETeacherSpec, check_moe_teacher
from knowpress.methods.distill.parallel import distributed
from knowpress.methods.distill.students import (
    StudentSpec,
    check_student,
    forward_problem,
    make_student,
    student_config,
)
from knowpress.methods.distill.trainer import OnPolicySpec, Trainer, TrainSpec
from knowpress.pipeline.context import Context
from knowpress.pipeline.distill_data import DistillData
from knowpress.pipeline.stage import STAGES, StageConfig

LossSpec = Annotated[
    Union[tuple(DISTILL_LOSSES.get(n) for n in DISTILL_LOSSES.names())],  # noqa: UP007
    Field(discriminator="name"),
]
CALIBRATION_BATCHES = 4  # batches the depth / width importance is measured on


def loss_sources(loss: Any) -> dict[str, Any]:
    """The models a loss loads itself (Delta-KD's bases), by recipe field."""
    specs = {name: getattr(loss, name) for name in type(loss).extra_models}
    return {f"loss.{name}": spec for name, spec in specs.items() if spec is not None}


def check_vocabulary(model: Any, teacher: Any, what: str) -> None:
    """One line when the teacher's vocabulary is not the model's (``what`` compares them)."""
    ours, theirs = model.config.vocab_size, teacher.config.vocab_size
    if ours != theirs:
        raise KnowpressError(
            f"teacher: its vocabulary ({theirs:,} tokens) is not the model's ({ours:,}); "
            f"{what} compares next-token distributions: give a teacher with the model's "
            f"tokenizer"
        )


@STAGES.register("distill")
class DistillConfig(StageConfig):
    summary = "train a student (copy, smaller config, depth/width-pruned) against the teacher"
    paper = "Hinton et al. 2015; Agarwal et al. 2024 (GKD); Shing et al. 2025 (TAID)"

    kind: Literal["distill"]
    student: StudentSpec = StudentSpec()
    loss: LossSpec = Field(default_factory=lambda: ForwardKL(name="forward_kl"))  # type: ignore[valid-type]
    sft_weight: float = Field(0.0, ge=0, le=1, description="share of CE on the labels")
    on_policy: OnPolicySpec | None = None
    moe_teacher: MoETeacherSpec | None = Field(None, description="MoE teachers: augment, router")
    teacher_cache: TeacherCacheSpec | None = Field(None, description="offline teacher top-k")
    train: TrainSpec = TrainSpec()
    needs_teacher = True
    trains_weights = True
    data_parallel = True

    def build(self) -> Distill:
        return Distill(self)

    def loads_teacher(self) -> bool:
        return self.teacher_cache is None or not self.teacher_cache.read_only

    def structure_after(self, model: Any) -> Any:
        """The student on the meta device: later stages are checked against its shapes."""
        import torch

        config = student_config(self.student, model.config)
        try:
            with torch.device("meta"):
                return type(model)(config)
        except Exception as exc:  # transformers' own checks of the overridden config
            raise KnowpressError(
                f"student: a {type(model).__name__} cannot be built with these shapes "
                f"({error_summary(exc)}); change student.config"
            ) from None

    def sources(self) -> dict[str, Any]:
        return loss_sources(self.loss)

    def check_teacher(self, model: Any, teacher: Any) -> None:
        check_vocabulary(model, teacher, "distillation")
        if self.moe_teacher is not None:
            problem = check_moe_teacher(self.moe_teacher, teacher.config)
            if problem:
                raise KnowpressError(f"{problem}; drop moe_teacher or give an MoE teacher")

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        problem = check_student(self.student, model.config)
        if problem:
            raise KnowpressError(problem)
        student = self.structure_after(model)
        if student.config.num_hidden_layers < 1:
            raise KnowpressError("student: keeps 0 decoder layers; keep at least one")
        if self.student.make == "config":  # values a config accepts but a forward refuses
            problem = forward_problem(type(student), student.config)
            if problem and forward_problem(type(model), model.config) is None:
                raise KnowpressError(
                    f"student.config: a {type(model).__name__} with these values cannot run "
                    f"({problem}); change student.config"
                )
        if self.teacher_cache is not None:
            problem = check_cache_path(self.teacher_cache)
            if problem:
                raise KnowpressError(problem)
        if packed_modules(model):
            raise KnowpressError(
                "distill trains float weights, and the model has packed layers from an "
                "earlier quantize stage: put the distill stage before quantize"
            )
        if self.loss.name == "ce" and self.on_policy is not None:
            raise KnowpressError("on_policy: loss 'ce' has no teacher to score the samples")
        if self.teacher_cache is not None:
            if not type(self.loss).binnable:
                raise KnowpressError(
                    f"teacher_cache: loss {self.loss.name!r} needs whole logits; the cache "
                    f"serves divergence losses (forward_kl, reverse_kl, gjsd, skew_*, tvd, akl)"
                )
            if self.moe_teacher is not None:
                raise KnowpressError(
                    "teacher_cache: a cached teacher cannot sample its routing or train its "
                    "routers; drop moe_teacher or the cache"
                )
            if self.teacher_cache.read_only and self.on_policy is not None:
                raise KnowpressError(
                    "teacher_cache.read_only: on-policy batches are scored by the live "
                    "teacher, which a read-only cache does not load; drop on_policy or read_only"
                )
        op = self.on_policy
        gkd = f", on-policy {op.rate:.0%} from the {op.source}" if op else ""
        return [f"student: {self.student.make}; loss {self.loss.name}{gkd}; "
                f"{self.train.steps} steps of {self.train.batch_size}"]  # fmt: skip


class Distill:
    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        cfg = self.config
        cfg.check(ctx.model, ctx.deploy_dtype)
        teacher = ctx.teacher if cfg.loads_teacher() else None  # read_only: every step cached
        if teacher is None and cfg.loads_teacher():
            raise KnowpressError("distill: no teacher was loaded (recipe.teacher)")
        if teacher is not None:
            cfg.check_teacher(ctx.model, teacher)
            if cfg.moe_teacher is not None and cfg.moe_teacher.router_lr > 0:
                teacher = copy.deepcopy(teacher)  # trains the routers of a copy, not the teacher
            teacher.eval().requires_grad_(False)
        data = training_data(ctx, cfg.train)
        pruned = cfg.student.make in ("depth", "width")  # importance needs calibration tokens
        calib = [
            data.batch(i)[0].to(ctx.device) for i in range(CALIBRATION_BATCHES if pruned else 0)
        ]
        # float32 weights for AdamW (bf16 autocast on cuda); the teacher stays in the compute dtype
        student = make_student(cfg.student, ctx.model, calib).to(ctx.device).float()
        student.requires_grad_(True)
        extra = extra_models(cfg.loss, student, ctx)
        checkpoint = ctx.resume_dir / "train_state.safetensors" if ctx.resume_dir else None
        key = ctx.resume_dir.name if ctx.resume_dir else "distill"
        trainer = Trainer(student, teacher, cfg.loss, data, cfg.train, cfg.on_policy,
                          cfg.sft_weight, checkpoint, key, extra, cfg.moe_teacher,
                          cfg.teacher_cache)  # fmt: skip
        outcome = trainer.run(progress)
        processes = distributed()[1]
        if processes > 1:
            ctx.metrics["parallel"] = {"processes": processes, "fsdp": trainer.sharded}
        if trainer.sharded:  # FSDP: rank 0 gets the whole student back, plain
            student = fsdp.plain_model(student, ctx.device)
            if student is None:
                return ctx  # a follower's share is done; rank 0 saves
        ctx.model = student
        if teacher is not None:
            ctx.metrics.update(
                teacher_parameters=parameter_count(teacher),
                student_share=parameter_count(student) / parameter_count(teacher),
            )
        ctx.metrics.update(
            student_parameters=parameter_count(student),
            student_config={k: getattr(student.config, k, None) for k in _SHAPE_KEYS},
            **{k: v for k, v in vars(outcome).items() if v != {}},
        )
        return ctx


_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim")  # fmt: skip


def extra_models(loss: Any, student: Any, ctx: Context) -> dict[str, Any]:
    """The loss's frozen base models (Delta-KD): loaded from their specs, or for an absent
    ``student_base`` the student as made, before any step. One vocabulary for all."""
    from knowpress.pipeline.sources import resolve_source

    models = {}
    for name in type(loss).extra_models:
        spec = getattr(loss, name)
        if spec is None:
            model = copy.deepcopy(student)
        else:
            source = resolve_source(spec, field=f"loss.{name}.path")
            model, _ = source.load(str(ctx.device), follow=ctx.compute_dtype)
        if model.config.vocab_size != student.config.vocab_size:
            raise KnowpressError(
                f"loss.{name}: its vocabulary ({model.config.vocab_size}) differs from the "
                f"student's ({student.config.vocab_size}); Delta-KD needs one vocabulary"
            )
        models[name] = model.eval().requires_grad_(False)
    return models


def training_data(ctx: Context, train: TrainSpec, kind: str = "distill") -> DistillData:
    """The world's training epochs, else ``data.calibration``'s texts (qad trains on them too)."""
    from knowpress.pipeline.calibration import calibration_texts

    world = ctx.world if hasattr(ctx.world, "training_in_context") else None
    texts = None if world is not None else calibration_texts(ctx.calibration, None)
    try:
        return DistillData(world, ctx.tokenizer, texts, train.batch_size, train.seq_len,
                           train.seed)  # fmt: skip
    except ValueError as exc:
        raise KnowpressError(f"{kind}: {exc} (set data.calibration.path)") from None
