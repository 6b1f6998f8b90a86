"""``kind: qad`` — quantization-aware distillation of a packed model against the teacher.

The input is a quantized artifact (packed int ``QuantLinear`` layers from a ``quantize``
stage, symmetric or asymmetric, any bits and group size). Each packed layer becomes a
``FakeQuantLinear`` (``tensors/fake_quant.py``): a float weight initialised to its
dequantized codes, a learnable per-group scale initialised to its stored scales, the zero
points fixed; the forward is ``W_q = s · (clamp(round(W/s) + z, 0, 2^b − 1) − z)`` with a
straight-through round and the LSQ gradient for ``s`` (Esser et al. 2020, arXiv:1902.08153).
Every other parameter stays frozen. It trains against the teacher with the distillation
trainer (``methods/distill/trainer.py``: any ``DISTILL_LOSSES`` loss, TAID, on-policy GKD,
``sft_weight``, mid-stage checkpoints and resume) on the distill stage's data, then packs
the result back into the input's modules: the same grid, bits, group sizes, scale dtype and
folder format, so the stored bytes equal the input's; the quantize stage's integrity check
runs on the saved folder. ``train_weights: false`` trains the scales alone (the codes then
move only where a scale moves them). The weights train in grid steps and the scales in
log-scale (``tensors/fake_quant.py``), so ``lr`` means the same at every width. Measured on
bios-dense-tiny at GPTQ int2 g32 (200 steps of 16, lr 1e-2, ``recipes/qad-int2.yaml``):
scales and weights take worst-task retention from 0.963 to 0.996 and KL from 0.070 to 0.046
nats/token, scales alone to 0.980 / 0.061; so ``train_weights`` defaults to true. The
input's folder format (compressed-tensors or knowpress's) is kept; the stage runs in one
process (no ``accelerate launch``).

```yaml
- kind: quantize
  method: {name: gptq, bits: 3, group_size: 32}
- kind: qad
  train_weights: true                   # false: scales only
  loss: {name: forward_kl}              # any DISTILL_LOSSES entry (taid, ...)
  on_policy: {rate: 0.25}               # optional (GKD)
  train: {steps: 200, batch_size: 16, lr: 1.0e-2}  # grid steps per update
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.weights import packed_modules
from knowpress.methods.distill.losses import ForwardKL, forward_kl
from knowpress.methods.distill.parallel import distributed
from knowpress.methods.distill.trainer import OnPolicySpec, Trainer, TrainSpec
from knowpress.methods.quant.plan import Assignment
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import Target
from knowpress.pipeline.context import Context
from knowpress.pipeline.integrity import verify_packed
from knowpress.pipeline.stage import STAGES, StageConfig
from knowpress.pipeline.stages.distill import (
    LossSpec,
    check_vocabulary,
    extra_models,
    loss_sources,
    training_data,
)
from knowpress.pipeline.stages.quantize import predicted_bytes

EVAL_BATCHES = 2  # batches the forward KL is measured on before and after training


class QADTrainSpec(TrainSpec):
    """distill's schedule with qad's learning rate: grid steps (and log-scale) per update
    (``tensors/fake_quant.py``); 1e-2 measured on ``recipes/qad-int2.yaml`` (worst-task
    retention 0.963 -> 0.996; 3e-2: KL 0.070 -> 0.096, overfit; 1e-1: 0.848)."""

    lr: float = Field(1e-2, gt=0, allow_inf_nan=False)


@STAGES.register("qad")
class QADConfig(StageConfig):
    summary = (
        "quantization-aware distillation: a packed model's scales (+ weights) trained against "
        "the teacher through a straight-through estimator, stored as before"
    )
    paper = "Esser et al. 2020 (LSQ), arXiv:1902.08153; Agarwal et al. 2024 (GKD)"

    kind: Literal["qad"]
    train_weights: bool = Field(True, description="false: train the scales only")
    loss: LossSpec = Field(default_factory=lambda: ForwardKL(name="forward_kl"))  # type: ignore[valid-type]
    sft_weight: float = Field(0.0, ge=0, le=1, description="share of CE on the labels")
    on_policy: OnPolicySpec | None = None
    train: QADTrainSpec = QADTrainSpec()
    needs_teacher = True
    packs_weights = True  # keeps the packing: allowed after quantize, nothing float after it

    def build(self) -> QAD:
        return QAD(self)

    def sources(self) -> dict[str, Any]:
        return loss_sources(self.loss)

    def check_teacher(self, model: Any, teacher: Any) -> None:
        check_vocabulary(model, teacher, "qad")

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        layers = trainable_layers(model)
        if self.loss.name == "ce" and self.on_policy is not None:
            raise KnowpressError("on_policy: loss 'ce' has no teacher to score the samples")
        settings = sorted({_settings(m) for m in layers.values()})
        what = "scales and weights" if self.train_weights else "scales"
        gkd = f", on-policy {self.on_policy.rate:.0%}" if self.on_policy else ""
        return [f"{len(layers)} packed linear layers ({', '.join(settings)}): {what} trained; "
                f"loss {self.loss.name}{gkd}; {self.train.steps} steps of "
                f"{self.train.batch_size}"]  # fmt: skip


def trainable_layers(model: Any) -> dict[str, Any]:
    """The packed layers qad trains (every packed module of ``model``); one line for a
    model without any, or with one it cannot train (the field of the quantize stage that
    made it is named)."""
    packed = packed_modules(model)
    if not packed:
        raise KnowpressError(
            "qad trains a quantized model's codes and scales, and its input has no packed "
            "layers: put a quantize stage before qad (or give a quantized model folder)"
        )
    for name, module in packed.items():
        kind = getattr(module, "kind", "fused_experts")  # packed experts carry no kind
        if kind != "linear":
            what = _KINDS.get(kind, kind.replace("_", " "))
            raise KnowpressError(
                f"qad trains packed linear layers, and {name} holds {what}: add '{name}' to "
                f"the quantize stage's ignore (quantize.ignore)"
            )
        if module.grid != "int":
            raise KnowpressError(
                f"qad trains the int grid, and {name} holds {module.grid} codes: use "
                f"quantize.method.dtype: int"
            )
    return packed


_KINDS = {"fused_experts": "packed fused MoE experts", "embedding": "a packed embedding",
          "tied_head": "a head tied to a packed embedding"}  # fmt: skip


def _settings(module: Any) -> str:
    return f"int{module.bits} g{module.group_size} {'sym' if module.symmetric else 'asym'}"


def assignments_of(model: Any) -> list[Assignment]:
    """Each packed linear layer as the quantize stage's plan would name it (its settings in
    an ``rtn`` method block: only bits, group size, symmetry and grid decide what is stored),
    for the integrity check."""
    out = []
    for name, m in packed_modules(model).items():
        target = Target(f"{name}.weight", name, "linear", (m.out_features, m.in_features))
        method = RTN(name="rtn", bits=m.bits, group_size=m.group_size, symmetric=m.symmetric)
        out.append(Assignment(target, method, None, None))
    return out


class QAD:
    def __init__(self, config: QADConfig) -> None:
        self.config = config
        self.assignments: list[Assignment] = []
        self.predicted, self.storage = 0, "knowpress"

    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.tensors.fake_quant import pack_back, swap_in

        cfg = self.config
        cfg.check(ctx.model, ctx.deploy_dtype)
        if distributed()[1] > 1:
            raise KnowpressError("qad runs in one process; run it without accelerate launch")
        teacher = ctx.teacher
        if teacher is None:
            raise KnowpressError("qad: no teacher was loaded (recipe.teacher)")
        cfg.check_teacher(ctx.model, teacher)
        teacher.eval().requires_grad_(False)
        model = ctx.model
        self.assignments = assignments_of(model)
        self.storage = _storage(model)
        self.predicted = predicted_bytes(model, self.assignments, ctx.deploy_dtype, self.storage)
        stored = {n: (m.weight_packed.clone(), m.weight_scale.clone())
                  for n, m in packed_modules(model).items()}  # fmt: skip
        model.requires_grad_(False)  # only the quantizers train
        swap_in(model, list(packed_modules(model)), cfg.train_weights)
        data = training_data(ctx, cfg.train, "qad")
        probe = [data.batch(cfg.train.steps + i) for i in range(EVAL_BATCHES)]
        before = distill_kl(model, teacher, probe, ctx.device)
        checkpoint = ctx.resume_dir / "train_state.safetensors" if ctx.resume_dir else None
        key = ctx.resume_dir.name if ctx.resume_dir else "qad"
        extra = extra_models(cfg.loss, model, ctx)
        trainer = Trainer(model, teacher, cfg.loss, data, cfg.train, cfg.on_policy,
                          cfg.sft_weight, checkpoint, key, extra)  # fmt: skip
        outcome = trainer.run(progress)
        after = distill_kl(model, teacher, probe, ctx.device)
        pack_back(model)
        now = packed_modules(model)
        new_codes = sum(not torch.equal(now[n].weight_packed, c) for n, (c, _) in stored.items())
        new_scales = sum(not torch.equal(now[n].weight_scale, s) for n, (_, s) in stored.items())
        ctx.model = model
        ctx.metrics.update(
            trained_layers=len(self.assignments),
            train_weights=cfg.train_weights,
            kd_loss_before=round(before, 6),
            kd_loss_after=round(after, 6),
            layers_with_new_codes=new_codes,
            layers_with_new_scales=new_scales,
            predicted_bytes=self.predicted,
            format=self.storage,
            **{k: v for k, v in vars(outcome).items() if v != {}},
        )
        return ctx

    def verify(self, ctx: Context, folder: Path) -> None:
        """The quantize stage's integrity check on the saved folder."""
        verify_packed(ctx, folder, self.assignments, self.predicted, self.storage)


def _storage(model: Any) -> str:
    """The input's folder format, as ``save_model`` decides it: compressed-tensors when every
    packed layer is stored so, else knowpress's packed format."""
    kinds = {getattr(m, "storage", "knowpress") for m in packed_modules(model).values()}
    return kinds.pop() if len(kinds) == 1 else "knowpress"


@torch.no_grad()
def distill_kl(model: Any, teacher: Any, batches: list[Any], device: Any) -> float:
    """Forward KL ``Σ p log(p/q)`` (teacher ``p``, student ``q``) per labelled token over
    ``batches`` (the data's batches just past the schedule's last step): the distillation
    loss before and after training, whatever the training loss."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for ids, attention, labels in batches:
        ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
        counted = labels[:, 1:] != -100
        s = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        t = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        per = forward_kl(s.log_softmax(-1), t.log_softmax(-1))
        total += float(per[counted].sum())
        count += int(counted.sum())
    model.train(was_training)
    return total / max(count, 1)
