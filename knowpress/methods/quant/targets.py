"""Quantization targets: which tensors a quantize stage must compress, by module or tensor name.

A target is one weight tensor: a linear layer's ``weight`` (``model.layers.0.mlp.up_proj.weight``,
or the logical weight of a layer an earlier stage packed), a fused MoE expert tensor
(transformers 5 stores all experts of a block in one 3-D parameter,
``model.layers.0.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``...experts.down_proj``
``[E, H, I]``), an embedding, or any other parameter with two or more dimensions.

Patterns (torchao ``FqnToConfig`` style) match a target's tensor name *or* the name of the
module that owns it: a glob (``*.mlp.*``, ``lm_head``) or, prefixed ``re:``, a regular
expression matched in full (``re:.*experts\\.down_proj``). ``targets: null`` selects every
linear layer and every fused expert tensor; ``ignore`` removes matches from the selection.
A pattern in ``targets`` that matches nothing is an error (a typo would otherwise leave the
model unquantized), and so is a targeted tensor the method cannot quantize, or one still
float after the method ran: never a warning.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from knowpress.core.errors import KnowpressError
from knowpress.tensors.qexperts import packed_names

Kind = Literal["linear", "fused_experts", "embedding", "other"]
DEFAULT_KINDS: tuple[Kind, ...] = ("linear", "fused_experts")


@dataclass(frozen=True)
class Target:
    """``name``: the tensor's qualified name; ``module``: its owner; ``tied``: the tensor is
    shared with another module (a tied output head)."""

    name: str
    module: str
    kind: Kind
    shape: tuple[int, ...]
    tied: bool = False

    @property
    def attribute(self) -> str:
        return self.name.rpartition(".")[2]


def matches(pattern: str, target: Target) -> bool:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return bool(regex.fullmatch(target.name) or regex.fullmatch(target.module))
    return fnmatch.fnmatchcase(target.name, pattern) or fnmatch.fnmatchcase(target.module, pattern)


def check_patterns(patterns: Sequence[str], field: str) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise KnowpressError(f"{field}: {pattern!r} is not a valid regex ({exc})") from None


def candidates(model: nn.Module) -> list[Target]:
    """Every weight tensor (two or more dimensions) of ``model``, in module order."""
    direct = [
        (module_name, module, attr, param)
        for module_name, module in model.named_modules()
        for attr, param in module.named_parameters(recurse=False)
    ]
    uses = Counter(id(param) for *_, param in direct)
    out: list[Target] = []
    for module_name, module in model.named_modules():
        fused = packed_names(module)  # fused experts packed by an earlier stage
        for attr, spec in fused.items():
            shape = (spec["experts"], spec["out_features"], spec["in_features"])
            out.append(Target(_join(module_name, attr), module_name, "fused_experts", shape))
        if callable(getattr(module, "packing_spec", None)) and not fused:
            kind = getattr(module, "kind", "linear")  # a packed linear layer or embedding
            if kind != "tied_head":  # a tied head's tensor is its embedding's
                rows, cols = module.dequantized_weight().shape  # type: ignore[operator]
                out.append(Target(_join(module_name, "weight"), module_name, kind, (rows, cols)))
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                kind = _kind(module, param.dim())
                name = _join(module_name, attr)
                out.append(Target(name, module_name, kind, tuple(param.shape), uses[id(param)] > 1))
    return out


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _kind(module: nn.Module, dims: int) -> Kind:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "fused_experts" if dims == 3 else "other"


def select(model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str]) -> list[Target]:
    """The targets of a quantize stage (see the module docstring)."""
    check_patterns([*(targets or []), *ignore], "quantize.targets/ignore")
    pool = candidates(model)
    if targets is None:
        chosen = [t for t in pool if t.kind in DEFAULT_KINDS]
    else:
        unmatched = [p for p in targets if not any(matches(p, t) for t in pool)]
        if unmatched:
            example = next((t.name for t in pool if t.kind == "linear"), pool[0].name)
            raise KnowpressError(
                f"quantize.targets: {unmatched[0]!r} matches no weight tensor of this model "
                f"(patterns match tensor or module names, e.g. {example!r}; 're:' for a regex)"
            )
        chosen = [t for t in pool if any(matches(p, t) for p in targets)]
    return [t for t in chosen if not any(matches(p, t) for p in ignore)]


def identity(model: nn.Module, target: Target) -> object:
    """What changes when a method quantizes ``target``: the module object of a linear layer
    (a new ``QuantLinear``), the packing generation of a fused expert tensor."""
    module = model.get_submodule(target.module)
    if target.kind == "fused_experts":
        return packed_names(module).get(target.attribute, {}).get("generation")
    return id(module)


def still_float(
    model: nn.Module, targets: Sequence[Target], before: dict[str, object]
) -> list[str]:
    """Targets the method left as they were (``before``: ``identity`` of each target name),
    or that are still a float parameter."""
    left = []
    for target in targets:
        module = model.get_submodule(target.module)
        param = module._parameters.get(target.attribute)
        packed = target.kind != "fused_experts" or target.attribute in packed_names(module)
        unchanged = before.get(target.name) == identity(model, target)
        if unchanged or not packed or (param is not None and param.is_floating_point()):
            left.append(target.name)
    return left
