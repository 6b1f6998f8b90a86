"""Reading a compressed-tensors folder back into knowpress's packed modules (``load_modules``):
the model built by transformers without the folder's quantization config — so the float
tensors go through every conversion of the architecture's checkpoint layout and nothing is
dequantized —, then each quantized linear rebuilt as a ``QuantLinear`` and each experts module
packed from its per-expert tensors (``ct_layout.read``), code for code."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knowpress.core.errors import KnowpressError
from knowpress.core.measure import trim_heap
from knowpress.formats.ct_layout import ExpertNames, Scheme, expert_names, read
from knowpress.tensors.packing import Quantized

FORMAT = "compressed-tensors"


def load_modules(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig

    from knowpress.formats.shards import LazyTensors

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    del config.quantization_config
    with LazyTensors(directory) as raw:  # each module's tensors read from its shard when used
        layout = _layout(raw, config.model_type)
        vacant = set(layout[0].values())
        model, info = _float_model(directory, config, dtype, trust_remote_code, vacant)
        groups = list((quant.get("config_groups") or {}).values())
        _rebuild(model, raw, layout, groups, set(info.get("missing_keys") or []), directory)
    return model.eval()


class _Vacant(nn.Module):
    """Where a packed linear goes, until ``_rebuild`` puts it there: the linear's shape, its
    bias (a float tensor the checkpoint holds) and no weight, so transformers neither finds
    one missing nor allocates and initialises it (a whole float model at the load dtype)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        # what ``QuantLinear.from_quantized`` reads of the weight: dtype, device (no memory)
        self.weight_like = torch.empty((), dtype=linear.weight.dtype, device="cpu").expand(
            linear.out_features, linear.in_features
        )


def _vacating(config: Any, vacant: set[str]) -> Any:
    """The architecture's causal-LM class with the linears in ``vacant`` made ``_Vacant``
    between construction and weight loading; None without any, or for an architecture
    transformers' auto mapping does not know (remote code)."""
    from knowpress.arch.layers import built_with

    def vacate(model: nn.Module) -> None:
        for name in vacant:  # a name no module has is refused by ``_rebuild``
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(linear, nn.Linear):
                model.set_submodule(name, _Vacant(linear))

    return built_with(config, vacate) if vacant else None


def _float_model(directory: Path, config: Any, dtype: torch.dtype, trust_remote_code: bool,
                 vacant: set[str]) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The model transformers builds from the folder without its quantization config (every
    shard of an indexed folder read), the linears in ``vacant`` left ``_Vacant``, and its
    loading info."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report lists every packed tensor as unexpected
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return (_vacating(config, vacant) or AutoModelForCausalLM).from_pretrained(
            directory, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=True, output_loading_info=True,
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# dense checkpoint prefix -> module name; experts module -> expert -> projection -> prefix
_Layout = tuple[dict[str, str], dict[str, dict[int, dict[str, str]]]]


def _layout(raw: Iterable[str], model_type: str) -> _Layout:
    """The quantized modules of ``raw`` (those with a ``weight_scale``): dense checkpoint
    prefix -> module name, and experts module -> expert -> projection -> prefix."""
    names = expert_names(model_type)
    expert = (re.compile(rf"(.+\.experts)\.(\d+)\.({names.gate}|{names.up}|{names.down})")
              if isinstance(names, ExpertNames) else None)  # fmt: skip
    dense: dict[str, str] = {}
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for prefix in sorted({k.rsplit(".", 1)[0] for k in raw if k.endswith(".weight_scale")}):
        hit = expert.fullmatch(prefix) if expert is not None else None
        if hit is not None:
            assert isinstance(names, ExpertNames)
            module = names.module(hit.group(1))
            experts.setdefault(module, {}).setdefault(int(hit.group(2)), {})[hit.group(3)] = prefix
        else:
            dense[prefix] = names.module(prefix) if isinstance(names, ExpertNames) else prefix
    return dense, experts


def _rebuild(model: nn.Module, raw: Mapping[str, torch.Tensor], layout: _Layout,
             groups: list[dict[str, Any]], missing_keys: set[str], directory: Path
             ) -> None:  # fmt: skip
    """Every quantized module of ``raw`` (``layout``: ``_layout`` of it) rebuilt packed."""
    from knowpress.formats.compressed_tensors import scheme_for

    names = expert_names(model.config.model_type)
    dense, experts = layout
    rebuilt = {f"{name}.weight" for name in dense.values()}
    rebuilt |= {f"{m}.{fused}" for m in experts for fused in ("gate_up_proj", "down_proj")}
    missing = sorted(missing_keys - rebuilt)
    if missing:  # transformers would run these randomly initialised
        raise KnowpressError(
            f"{directory}: {len(missing)} weight(s) of this architecture are not in the "
            f"checkpoint (first: {missing[0]}); its layout is not one this transformers loads "
            f"(e.g. per-expert names from an older MoE export)"
        )
    for prefix, name in dense.items():
        linear = _submodule(model, name, directory)
        scheme = scheme_for(groups, prefix, directory)
        q = read(raw, prefix, scheme, linear.in_features)
        model.set_submodule(name, _quant_linear(linear, q, scheme))
        del q
        trim_heap()  # the unpacked codes, back to the OS before the next module's
    for module, by_expert in experts.items():
        assert isinstance(names, ExpertNames)
        stored = {
            j: {proj: _expert(model, raw, groups, prefix, module, proj, names, directory)
                for proj, prefix in projections.items()}
            for j, projections in by_expert.items()
        }  # fmt: skip
        _install_experts(model, module, stored, names, directory)


def _submodule(model: nn.Module, name: str, directory: Path) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KnowpressError(
            f"{directory}: packed tensor {name} names no module of {type(model).__name__} (a "
            f"checkpoint layout this transformers does not load)"
        ) from None


def _quant_linear(linear: nn.Module, q: Quantized, scheme: Scheme) -> nn.Module:
    from knowpress.tensors.qlinear import QuantLinear

    group = scheme.group_size or linear.in_features
    module = QuantLinear.from_quantized(linear, q, scheme.bits, group, FORMAT, scheme.grid,
                                        weight=getattr(linear, "weight_like", None))  # fmt: skip
    module.storage = FORMAT
    return module


def _expert(model: nn.Module, raw: Mapping[str, torch.Tensor], groups: list[dict[str, Any]],
            prefix: str, module: str, proj: str, names: ExpertNames, directory: Path,
            ) -> tuple[Quantized, Scheme]:  # fmt: skip
    """One expert's stored projection, read at the width of the fused tensor it joins."""
    from knowpress.formats.compressed_tensors import scheme_for

    experts = _submodule(model, module, directory)
    fused = "down_proj" if proj == names.down else "gate_up_proj"
    tensor = getattr(experts, fused, None)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise KnowpressError(f"{directory}: {module} has no fused {fused} to merge experts into")
    scheme = scheme_for(groups, prefix, directory)
    return read(raw, prefix, scheme, int(tensor.shape[2])), scheme


def _install_experts(model: nn.Module, module: str, by_expert: dict[int, dict[str, Any]],
                     names: ExpertNames, directory: Path) -> None:  # fmt: skip
    from knowpress.tensors.qexperts import install, joined, spec_for

    experts = _submodule(model, module, directory)
    count = experts.gate_up_proj.shape[0]
    if sorted(by_expert) != list(range(count)):
        raise KnowpressError(
            f"{directory}: {module} has {count} experts, the folder stores {len(by_expert)}"
        )
    for fused, projections in (("gate_up_proj", (names.gate, names.up)),
                               ("down_proj", (names.down,))):  # fmt: skip
        parts = []
        for j in range(count):
            stored = [by_expert[j].get(p) for p in projections]
            if any(s is None for s in stored):
                raise KnowpressError(f"{directory}: expert {j} of {module} lacks {projections}")
            qs = [s[0] for s in stored]  # type: ignore[index]
            first = qs[0].global_scale
            if first is not None and not all(torch.equal(q.global_scale, first) for q in qs):
                raise KnowpressError(
                    f"{directory}: expert {j} of {module}: {projections} have different global "
                    "scales; knowpress packs them as one"
                )
            parts.append(joined(qs))
            parts[-1] = Quantized(parts[-1].codes, parts[-1].scales, parts[-1].zeros, first)
        scheme: Scheme = by_expert[0][projections[0]][1]
        flat = joined(parts)
        shape = (count, flat.codes.shape[0] // count, flat.codes.shape[1])
        group = scheme.group_size or shape[2]
        spec = spec_for(torch.empty(shape, device="meta"), scheme.bits, group, scheme.symmetric,
                        FORMAT, None, scheme.grid)  # fmt: skip
        install(experts, fused, spec, flat)
    experts.storage = FORMAT


def ct_skeleton(directory: Path, trust_remote_code: bool) -> nn.Module:
    """The folder's model on the current default device (meta: shapes, no memory) with a
    packed module, buffers unset, for each quantized one the folder stores, at its config
    group's settings: what the checks before the first write see (``load_modules`` fills
    the same modules from the stored values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from knowpress.formats.compressed_tensors import scheme_for
    from knowpress.formats.shards import folder_header
    from knowpress.tensors.qexperts import install, spec_for
    from knowpress.tensors.qlinear import QuantLinear

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    groups = list((quant.get("config_groups") or {}).values())
    dense, experts = _layout(folder_header(directory), config.model_type)
    names = expert_names(config.model_type)
    for prefix, name in dense.items():
        linear, scheme = _submodule(model, name, directory), scheme_for(groups, prefix, directory)
        n = linear.in_features
        module = QuantLinear(n, linear.out_features, scheme.bits, scheme.group_size or n,
                             scheme.symmetric, linear.bias is not None, FORMAT,
                             grid=scheme.grid)  # fmt: skip
        module.storage = FORMAT
        model.set_submodule(name, module)
    for name, by_expert in experts.items():
        module = _submodule(model, name, directory)
        first = by_expert[min(by_expert)]
        for fused, proj in (("gate_up_proj", names.gate), ("down_proj", names.down)):
            if proj not in first:
                raise KnowpressError(f"{directory}: expert {min(by_expert)} of {name} lacks {proj}")
            scheme = scheme_for(groups, first[proj], directory)
            weight = getattr(module, fused)
            spec = spec_for(weight, scheme.bits, scheme.group_size or weight.shape[2],
                            scheme.symmetric, FORMAT, None, scheme.grid)  # fmt: skip
            install(module, fused, spec, None)
        module.storage = FORMAT
    return model
