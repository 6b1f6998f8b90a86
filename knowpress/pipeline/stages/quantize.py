"""``kind: quantize`` — weight-only quantization of the tensors the recipe targets.

``targets`` (module or tensor names, globs or ``re:`` regexes; default: every linear layer
and every fused MoE expert tensor) minus ``ignore`` (the output head by default: tied to the
embedding in small models, and the most quantization-sensitive layer) are handed to the
method from ``QUANT_METHODS``; see ``methods/quant/targets.py`` for the matching rules.
Before any work, every target must be one the method can quantize; after it, none may be
left float. The stage predicts the bytes of the saved folder from the plan (packed codes,
scales and zero points of every target, every other tensor in the deploy dtype, the
safetensors header) as ``details.predicted_bytes``, next to what the runner measures.

```yaml
- kind: quantize
  method: {name: rtn, bits: 4, group_size: 32}
  targets: ["re:.*\\.mlp\\..*"]     # optional; default: every linear + fused expert tensor
  ignore: [lm_head]
  plan: {rules: [{match: "*.down_proj", bits: 8}]}   # optional per-tensor settings (plan.py)
  bits_plan: {name: sensitivity, avg_bits: 3}          # optional widths by integer programming
```

``bits_plan`` (``methods/quant/bit_plans/``): ``moe_lp`` (a width per routed expert) or
``sensitivity`` (a width per linear, at the byte budget uniform ``avg_bits`` stores). The folder
format is decided on the widths the plan may mix (``storage_view``) before it runs, so the
plan's byte accounting is the folder's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field
from torch import nn

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats.sizes import Entry, dtype_tag, safetensors_bytes
from knowpress.formats.weights import deploy_dtype_of, packed_modules, packed_tensor_of
from knowpress.methods.quant import QUANT_METHODS
from knowpress.methods.quant.base import QuantMethod
from knowpress.methods.quant.bit_plans import BIT_PLANS, BitPlan
from knowpress.methods.quant.plan import Assignment, PlanSpec, resolve
from knowpress.methods.quant.targets import identity, select, still_float
from knowpress.pipeline.blockwise import onload_for
from knowpress.pipeline.context import Context
from knowpress.pipeline.integrity import verify_packed
from knowpress.pipeline.stage import STAGES, StageConfig

QuantMethodSpec = Annotated[
    Union[tuple(QUANT_METHODS.get(n) for n in QUANT_METHODS.names())],  # noqa: UP007
    Field(discriminator="name"),
]
BitPlanSpec = Annotated[
    Union[tuple(BIT_PLANS.get(n) for n in BIT_PLANS.names())],  # noqa: UP007
    Field(discriminator="name"),
]


@STAGES.register("quantize")
class QuantizeConfig(StageConfig):
    summary = "weight-only quantization of targeted tensors, stored packed"

    packs_weights = True
    blockwise = True

    kind: Literal["quantize"]
    method: QuantMethodSpec  # type: ignore[valid-type]
    targets: list[str] | None = Field(
        None, description="module/tensor name globs or re: regexes; null = every linear + experts"
    )
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="name globs")
    plan: PlanSpec | None = Field(None, description="per-tensor bits / group size rules")
    bits_plan: BitPlanSpec | None = Field(  # type: ignore[valid-type]
        None, description="widths by integer programming: moe_lp (experts), sensitivity (linears)"
    )
    format: Literal["auto", "knowpress", "compressed-tensors"] = Field(
        "auto", description="folder format; auto: compressed-tensors when it can hold the output"
    )

    def storage(self, model: nn.Module, assignments: list[Assignment]) -> tuple[str, str | None]:
        """The folder format of this stage's output and, when auto fell back to knowpress's
        packed format, why (``formats/compressed_tensors.py`` says what it holds)."""
        from knowpress.formats.compressed_tensors import FORMAT, blocker

        if self.format == "knowpress":
            return "knowpress", None
        reason = blocker(planned_items(model, assignments), model, _float_after(model, assignments))
        if reason and self.format == FORMAT:
            raise KnowpressError(
                f"quantize.format: compressed-tensors cannot hold this output: {reason}; use "
                f"format: auto or knowpress"
            )
        return ("knowpress", reason) if reason else (FORMAT, None)

    def build(self) -> Quantize:
        return Quantize(self)

    def resolve(self, model: nn.Module) -> list[Assignment]:
        """Each target with its settings, after every check that needs no weights."""
        targets = select(model, self.targets, self.ignore)
        if not targets:
            raise KnowpressError(
                "quantize: targets minus ignore leave no tensor to quantize "
                "(narrow the ignore globs or remove the stage)"
            )
        assignments = resolve(self.method, self.plan, targets)
        problems = [p for a in assignments if (p := a.method.check_target(a.target))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise KnowpressError(f"quantize.method: {problems[0]}{more}")
        return assignments

    def structure_after(self, model: Any) -> Any:
        """A meta copy of ``model`` with every target packed (empty buffers) at its planned
        settings and folder format: a later stage (qad) is checked against the packed layers."""
        import copy

        from knowpress.tensors.qembed import install_embedding
        from knowpress.tensors.qexperts import current_weight, install, spec_for
        from knowpress.tensors.qlinear import QuantLinear

        assignments = self.resolve(model)
        if self.bits_plan is not None:  # widths the plan may choose (shapes alike)
            assignments = self.bits_plan.storage_view(assignments)
        storage, _ = self.storage(model, assignments)
        packed = copy.deepcopy(model)
        with torch.device("meta"):  # shapes only, no rounding
            for a in assignments:
                m: Any = a.method
                t = a.target
                g = m.group(t.shape[-1])
                module = packed.get_submodule(t.module)
                if t.kind == "linear":
                    bias = getattr(module, "bias", None) is not None
                    packed.set_submodule(t.module, QuantLinear(
                        t.shape[1], t.shape[0], m.bits, g, m.symmetric, bias, m.name,
                        grid=m.dtype))  # fmt: skip
                elif t.kind == "fused_experts":
                    weight = current_weight(module, t.attribute)
                    spec = spec_for(weight, m.bits, g, m.symmetric, m.name, m.expert_bits, m.dtype)
                    install(module, t.attribute, spec, None)
                else:  # an embedding table (int grid): rounding meta tensors costs nothing
                    install_embedding(packed, t.module, m.bits, g, m.symmetric, m.name)
        for module in packed_modules(packed).values():
            module.storage = storage
        return packed

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        assignments = self.resolve(model)
        plan: BitPlan | None = self.bits_plan
        if plan is not None:
            plan.check(assignments, self.method, model)
        storage, reason = self.storage(
            model, plan.storage_view(assignments) if plan else assignments
        )
        predicted = predicted_bytes(model, assignments, deploy_dtype, storage)
        lines = plan_lines(self, assignments, predicted)
        if plan is not None:
            lines += plan.lines(model, assignments, storage, predicted)
        return [*lines, f"format: {storage}" + (f" ({reason})" if reason else "")]


def plan_lines(config: QuantizeConfig, assignments: list[Assignment], predicted: int) -> list[str]:
    """What ``--dry-run`` prints of a quantize stage: each rule's tensors and settings, the
    group-size fallbacks, the predicted bytes."""
    lines = []
    for index in [None, *range(len(config.plan.rules if config.plan else []))]:
        chosen = [a for a in assignments if a.rule == index]
        if not chosen:
            continue
        rules = config.plan.rules if config.plan else []
        label = "method" if index is None else f"rule {index} {rules[index].match!r}"
        settings = sorted({_settings(a.method) for a in chosen})
        names = [a.target.name for a in chosen]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"{label}: {len(chosen)} tensors at {' / '.join(settings)}: {shown}")
    lines += [f"fallback: {a.target.name}: {a.fallback}" for a in assignments if a.fallback]
    lines.append(f"predicted bytes: {predicted:,}")
    return lines


def _settings(method: QuantMethod) -> str:
    group = getattr(method, "group_size", None)
    kind = "sym" if getattr(method, "symmetric", False) else "asym"
    grouping = "per-row" if group is None else f"g{group}"
    grid = getattr(method, "dtype", "int")
    code = f"int{getattr(method, 'bits', '?')}" if grid == "int" else grid
    return f"{method.name} {code} {grouping} {kind}"


def planned_items(model: nn.Module, assignments: list[Assignment]) -> list[Any]:
    """What compressed-tensors would store (``compressed_tensors.Item``): the planned targets
    at their settings, and the modules earlier stages packed that this one leaves as they are."""
    from knowpress.formats.compressed_tensors import Item, items_of
    from knowpress.formats.ct_layout import scheme_of

    targeted = {a.target.module for a in assignments}
    fused: dict[str, list[Any]] = {}
    items = [i for i in items_of(packed_modules(model)) if i.module not in targeted]
    for a in assignments:
        m: Any = a.method
        t = a.target
        if t.kind not in ("linear", "fused_experts"):
            items.append(Item(t.module, t.kind))
            continue
        n = t.shape[-1]
        scheme = scheme_of(m.dtype, m.bits, m.group(n), m.symmetric, n)
        if t.kind == "linear":
            items.append(Item(t.module, "linear", scheme, tuple(t.shape)))
        else:
            fused.setdefault(t.module, []).append(
                (t.attribute, scheme, tuple(t.shape), bool(m.expert_bits)))  # fmt: skip
    model_type = str(getattr(model.config, "model_type", ""))
    for module, tensors in fused.items():
        items.append(Item(module, "fused_experts", fused=tuple(sorted(tensors)),
                          model_type=model_type))  # fmt: skip
    return items


def _float_after(model: nn.Module, assignments: list[Assignment]) -> list[str]:
    """Fused expert tensors this stage leaves float (neither targeted nor packed before)."""
    from knowpress.formats.compressed_tensors import float_experts

    targeted = {a.target.name for a in assignments}
    return [name for name in float_experts(model) if name not in targeted]


class Quantize:
    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config
        self.assignments: list[Assignment] = []
        self.predicted = 0
        self.storage = "knowpress"

    def run(self, ctx: Context, progress: Progress) -> Context:
        method: QuantMethod = self.config.method
        assignments = self.config.resolve(ctx.model)
        plan: BitPlan | None = self.config.bits_plan
        view = plan.storage_view(assignments) if plan else assignments
        storage, reason = self.config.storage(ctx.model, view)  # decided before the plan sizes
        if plan is not None:
            assignments = _planned(plan, assignments, storage, ctx, progress)
        targets = [a.target for a in assignments]
        predicted = predicted_bytes(ctx.model, assignments, ctx.deploy_dtype, storage)
        self.assignments, self.predicted, self.storage = assignments, predicted, storage
        before = {t.name: identity(ctx.model, t) for t in targets}
        plan = {a.target.name: a.method for a in assignments}
        onload = onload_for(ctx)
        ctx.metrics.update(
            method.apply(ctx.model, targets, calibration(ctx), progress, plan, onload)
        )
        left = still_float(ctx.model, targets, before)
        if left:
            raise KnowpressError(
                f"quantize: {len(left)} targeted tensor(s) still float after {method.name} "
                f"(first: {left[0]}); this is a bug in the method, please report it"
            )
        for module in packed_modules(ctx.model).values():
            module.storage = storage  # how the runner's save writes them
        ctx.metrics.update(
            quantized_tensors=len(targets),
            predicted_bytes=predicted,
            float_weights_left=untargeted_float_weights(ctx.model),
            format=storage,
        )
        if reason:
            ctx.metrics["format_reason"] = f"knowpress's packed format: {reason}"
        fallbacks = {a.target.name: a.fallback for a in assignments if a.fallback}
        if fallbacks:
            ctx.metrics["group_fallbacks"] = fallbacks
        return ctx

    def verify(self, ctx: Context, folder: Path) -> None:
        """The integrity check (``pipeline/integrity.py``) on the saved folder."""
        verify_packed(ctx, folder, self.assignments, self.predicted, self.storage)


def _planned(plan: BitPlan, assignments: list[Assignment], storage: str, ctx: Context,
             progress: Progress) -> list[Assignment]:  # fmt: skip
    """The assignments at the widths ``plan`` chooses on the calibration batches (8 sequences
    a pass); the plan's figures go into the stage details."""
    from knowpress.pipeline.calibration import calibration_batches

    positions = int(getattr(ctx.model.config, "max_position_embeddings", 2048))
    batches = calibration_batches(ctx.calibration_ids(positions))
    progress.log(f"[dim]quantize: {plan.name} bit plan (integer program)[/dim]")
    chosen, details = plan.plan(ctx.model, assignments, batches, onload_for(ctx), storage)
    ctx.metrics["bits_plan"] = details
    return chosen


def predicted_bytes(
    model: nn.Module, assignments: list[Assignment], deploy_dtype: str, storage: str = "knowpress"
) -> int:
    """Bytes the saved safetensors will take: each target's stored tensors at its assigned
    settings in the folder format ``storage``, every other tensor of the model in its storage
    dtype (tied tensors once), the safetensors header."""
    from knowpress.formats import compressed_tensors as ct_format

    deploy = getattr(torch, deploy_dtype)
    targeted = {a.target.name for a in assignments}
    packed = packed_modules(model)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if storage == ct_format.FORMAT:
        entries: list[Entry] = []
        for item in planned_items(model, assignments):
            entries += ct_format.item_entries(item)
            names = [n for n, *_ in item.fused] if item.fused else ["weight"]
            targeted |= {f"{item.module}.{n}" for n in names}
    else:
        entries = [e for a in assignments for e in a.method.stored_entries(a.target)]
    for key, tensor in model.state_dict().items():
        if key in targeted or packed_tensor_of(key, set(packed)) in targeted or key in tied:
            continue  # replaced by the method's entries, or stored once under its tie
        tag = dtype_tag(deploy_dtype_of(key, tensor, packed, deploy))
        entries.append((key, tag, tuple(tensor.shape)))
    return safetensors_bytes(entries)


def untargeted_float_weights(model: nn.Module) -> int:
    """Elements of float tensors with two or more dimensions left (embeddings, ignored
    layers, fused experts not targeted): the report shows what stayed in the deploy dtype."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.dim() >= 2 and param.is_floating_point() and id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def calibration(ctx: Context) -> Any:
    """The calibration batches a data-aware method asks for (read and tokenized on first
    use: RTN never does): ``data.calibration`` sequences, 8 per forward pass."""
    from knowpress.pipeline.calibration import calibration_batches

    return lambda max_positions: calibration_batches(ctx.calibration_ids(max_positions), 8)
