"""compressed-tensors folders: packed checkpoints stock transformers loads.

With the ``compressed-tensors`` package installed, ``AutoModelForCausalLM.from_pretrained``
reads these folders with no knowpress import (vLLM / SGLang serve the formats): each quantized
module stores its codes, scales (and zero points / global scale) in the layout of its grid
(``ct_layout.py``: ``pack-quantized`` int, ``float-quantized`` fp8, ``nvfp4-pack-quantized``,
``mxfp4-pack-quantized``), and ``config.json`` carries the ``quantization_config`` with one
config group per distinct setting. knowpress writes them from its packed codes (no
re-quantization) and reads them back into the same packed modules, so later stages re-save
them packed and what is measured is what is stored.

Fused 3-D MoE experts are written per expert in the architecture's checkpoint layout, which
transformers 5.23 merges into its fused tensors and dequantizes while loading. What the
released versions (transformers 5.23, compressed-tensors 0.20.1) cannot load stays in
knowpress's packed format, the reason recorded (:func:`blocker`): embedding tables, experts
with zero points (transformers#47430), nvfp4 experts (loaded without their global scale,
transformers#48371), experts at several widths or settings (every expert is decoded with one
config group), an architecture with no per-expert conversion mapping. Asymmetric int linears
load with ``CompressedTensorsConfig(dequantize=True)`` (the default load fails on the packed
zero points: transformers builds them on the meta device unpacked), and so do nvfp4 / mxfp4
on a CPU in float32 (their unpacker returns bfloat16; ``dtype=torch.bfloat16`` also works).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knowpress.core.errors import KnowpressError
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE
from knowpress.formats.base import Format, register
from knowpress.formats.ct_layout import (
    FORMATS,
    ExpertNames,
    Scheme,
    entries,
    expert_names,
    read_scheme,
    scheme_of,
    tensors,
)

FORMAT = "compressed-tensors"
FUSED = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Item:
    """One packed module as compressed-tensors would store it: ``kind`` linear /
    fused_experts / embedding / tied_head, its ``scheme`` (fused: per tensor in ``fused``)."""

    module: str
    kind: str
    scheme: Scheme | None = None
    shape: tuple[int, ...] = ()
    fused: tuple[tuple[str, Scheme, tuple[int, ...], bool], ...] = ()  # name, scheme, shape, mixed
    model_type: str = ""


def _model_type(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        parts = cls.__module__.split(".")
        if parts[:2] == ["transformers", "models"] and len(parts) > 2:
            return parts[2]
    return ""


def items_of(modules: dict[str, nn.Module]) -> list[Item]:
    """The :class:`Item` of every packed module (``formats/weights.packed_modules``)."""
    from knowpress.tensors.qexperts import packed_names

    items = []
    for name, module in modules.items():
        specs = packed_names(module)
        if specs:
            fused = tuple(
                (attr, scheme_of(s.get("grid", "int"), s["bits"], s["group_size"],
                                 s["symmetric"], s["in_features"]),
                 (s["experts"], s["out_features"], s["in_features"]), bool(s.get("expert_bits")))
                for attr, s in sorted(specs.items())
            )  # fmt: skip
            items.append(Item(name, "fused_experts", fused=fused, model_type=_model_type(module)))
        elif getattr(module, "kind", "") == "linear":
            q: Any = module
            scheme = scheme_of(q.grid, q.bits, q.group_size, q.symmetric, q.in_features)
            items.append(Item(name, "linear", scheme, (q.out_features, q.in_features)))
        else:
            items.append(Item(name, getattr(module, "kind", "module")))
    return items


def blocker(items: list[Item], model: nn.Module | None = None,
            float_fused: list[str] | None = None) -> str | None:  # fmt: skip
    """Why these packed modules cannot be stored as compressed-tensors that the released
    transformers loads (None: they can). With ``model``, every fused expert tensor must be
    packed (``float_fused``: those left float, by default the model's float ones): a float
    expert beside packed ones is not a layout transformers merges."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return "the compressed-tensors package is not installed (pip install compressed-tensors)"
    experts: set[Scheme] = set()
    for item in items:
        if item.kind in ("embedding", "tied_head"):
            return f"{item.module} is a packed embedding table, which transformers cannot load"
        if item.kind != "fused_experts":
            continue
        names = expert_names(item.model_type)
        if isinstance(names, str):
            return f"{item.module}: {names}"
        if {n for n, *_ in item.fused} != set(FUSED):
            return f"{item.module} has only {[n for n, *_ in item.fused]} packed; pack both"
        for name, scheme, _, mixed in item.fused:
            where = f"{item.module}.{name}"
            if mixed:
                return (f"{where} stores each expert at its own width (a bits_plan); "
                        f"transformers 5.23 decodes every expert with the first config "
                        f"group targeting experts (Mixtral fails, Qwen3-MoE loads wrong "
                        f"weights)")  # fmt: skip
            if not scheme.symmetric:
                return (f"{where} has zero points, which transformers 5.23 drops when it "
                        f"merges experts (transformers#47430)")  # fmt: skip
            if scheme.grid == "nvfp4":
                return (f"{where} is nvfp4, whose experts transformers 5.23 dequantizes "
                        f"without their global scale (transformers#48371)")  # fmt: skip
            experts.add(scheme)
    dense = {i.scheme for i in items if i.kind == "linear"}
    if len(dense) > 1 and any(s is not None and not s.symmetric for s in dense):
        return (f"its asymmetric linears load only with CompressedTensorsConfig(dequantize="
                f"True), which decodes every dense module with one config group in "
                f"transformers 5.23, and they need {len(dense)} (settings or a per-row layer "
                f"differ)")  # fmt: skip
    if len(experts) > 1:
        return ("the experts are stored at several settings; transformers 5.23 decodes every "
                "expert with one config group")  # fmt: skip
    if experts and model is not None:
        left = float_experts(model) if float_fused is None else float_fused
        if left:
            return f"{left[0]} stays float beside packed experts; target every expert"
    return None


def float_experts(model: nn.Module) -> list[str]:
    """The fused 3-D expert tensors of ``model`` still float."""
    return [f"{name}.{attr}" for name, module in model.named_modules() for attr in FUSED
            if isinstance(module._parameters.get(attr), torch.Tensor)
            and module._parameters[attr].dim() == 3]  # fmt: skip


def _names(item: Item) -> ExpertNames:
    names = expert_names(item.model_type)
    if isinstance(names, str):
        raise KnowpressError(f"compressed-tensors: {item.module}: {names}")
    return names


def item_entries(item: Item) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype tag, shape) of everything compressed-tensors stores for ``item``."""
    if item.kind == "linear":
        assert item.scheme is not None
        return entries(item.module, *item.shape, item.scheme)
    names, out = _names(item), []
    prefix = names.prefix(item.module)
    for attr, scheme, (e, rows, n), _ in item.fused:
        projections = [(names.down, rows)] if attr == "down_proj" else [
            (names.gate, rows // 2), (names.up, rows // 2)]  # fmt: skip
        for j in range(e):
            for proj, height in projections:
                out += entries(f"{prefix}.{j}.{proj}", height, n, scheme)
    return out


def _groups(items: list[Item]) -> dict[tuple[bool, Scheme], list[str]]:
    """Config groups: (experts?, scheme) -> targets, dense groups first (linears by name;
    experts by one ``re:`` pattern, as transformers finds the experts' group by a ``re:``
    target naming experts)."""
    groups: dict[tuple[bool, Scheme], list[str]] = {}
    for item in items:
        if item.kind == "linear":
            assert item.scheme is not None
            groups.setdefault((False, item.scheme), []).append(item.module)
        else:
            pattern = _names(item).pattern()
            targets = groups.setdefault((True, item.fused[0][1]), [])
            if pattern not in targets:
                targets.append(pattern)
    return dict(sorted(groups.items(), key=lambda kv: kv[0][0]))


def quantization_config(items: list[Item], ignore: list[str]) -> dict[str, Any]:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    schemes, formats = {}, set()
    for i, ((_, scheme), targets) in enumerate(_groups(items).items()):
        formats.add(FORMATS[scheme.grid])
        schemes[f"group_{i}"] = QuantizationScheme(targets=targets, weights=scheme.args(),
                                                   format=FORMATS[scheme.grid])  # fmt: skip
    overall = formats.pop() if len(formats) == 1 else "mixed-precision"
    config = QuantizationConfig(config_groups=schemes, format=overall, ignore=ignore,
                                quantization_status="compressed")  # fmt: skip
    return {"version": compressed_tensors.__version__, "quant_method": FORMAT,
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(exclude={"quant_method"}, mode="json")}  # fmt: skip


def ct_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of every packed module (from its codes)."""
    from knowpress.tensors.grids import expand_rows
    from knowpress.tensors.packing import Quantized, unpack
    from knowpress.tensors.qexperts import packed_names

    state: dict[str, torch.Tensor] = {}
    for item in items_of(modules):
        module: Any = modules[item.module]
        if item.kind == "linear":
            assert item.scheme is not None
            zeros = module.weight_zero_point
            groups = module.in_features // module.group_size
            q = Quantized(
                unpack(module.weight_packed, module.bits, module.in_features),
                expand_rows(module.weight_scale, module.out_features, module.grid,
                            module.group_size, module.in_features),
                None if zeros is None else unpack(zeros, module.bits, groups),
                module.weight_global_scale,
            )  # fmt: skip
            state.update(tensors(item.module, q, item.scheme))
            continue
        names = _names(item)
        prefix = names.prefix(item.module)
        for attr, scheme, (e, rows, n), _ in item.fused:
            spec = packed_names(module)[attr]
            codes = unpack(getattr(module, f"{attr}_packed"), spec["bits"], n)
            scales = getattr(module, f"{attr}_scale")
            globals_ = getattr(module, f"{attr}_global_scale", None)
            zeros = getattr(module, f"{attr}_zero_point", None)  # (blocker refuses them)
            if zeros is not None:
                zeros = unpack(zeros, spec["bits"], n // spec["group_size"])
            half = rows // 2
            for j in range(e):
                g = None if globals_ is None else globals_[j]
                parts = [(names.down, slice(0, rows))] if attr == "down_proj" else [
                    (names.gate, slice(0, half)), (names.up, slice(half, rows))]  # fmt: skip
                for proj, part in parts:
                    z = None if zeros is None else zeros[j, part]
                    q = Quantized(codes[j, part], scales[j, part], z, g)
                    state.update(tensors(f"{prefix}.{j}.{proj}", q, scheme))
    return state


def _ignore(model: nn.Module, items: list[Item]) -> list[str]:
    """Modules a ``Linear`` target would catch that stay float: the head and the routers
    (by their checkpoint names, as vLLM reads them)."""
    ignore = [] if any(i.module == "lm_head" for i in items) else ["lm_head"]
    for item in items:
        if item.kind == "fused_experts":
            router = _names(item).prefix(item.module).rsplit(".", 1)[0] + ".gate"
            pattern = "re:.*" + router.split(".", 3)[-1].replace(".", r"\.") + "$"
            if pattern not in ignore:
                ignore.append(pattern)
    return ignore


def write_config(directory: Path, model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Add the ``quantization_config`` to the folder's config.json."""
    from knowpress.core.io import atomic_write_text

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    items = items_of(modules)
    config["quantization_config"] = quantization_config(items, _ignore(model, items))
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_ct_folder(directory: Path) -> bool:
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == FORMAT


def scheme_for(groups: list[dict[str, Any]], name: str, directory: Path) -> Scheme:
    """The scheme of the config group targeting checkpoint module ``name``: a target naming
    it (exact, or ``re:`` regex) first, else one naming its class. Every module a folder
    stores packed is a ``Linear`` in the checkpoint's layout (experts too, per expert), so
    ``Linear``, llm-compressor's usual target (its W4A16 preset), catches each of them."""
    import re

    def hit(target: str) -> bool:
        return bool(re.fullmatch(target[3:], name)) if target.startswith("re:") else target == name

    named = (g for g in groups if any(hit(t) for t in g.get("targets", [])))
    by_class = (g for g in groups if "Linear" in g.get("targets", []))
    group = next(named, None)
    group = next(by_class, None) if group is None else group
    if group is None:
        raise KnowpressError(f"{directory}: {name} is quantized but no config group targets it")
    scheme = read_scheme(group.get("weights") or {})
    if isinstance(scheme, str):
        raise KnowpressError(f"{directory}: {name}: {scheme} are not packed here")
    return scheme


def load_ct(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A compressed-tensors folder as knowpress's packed modules: the model built by
    transformers from the folder without its quantization config (every conversion of the
    architecture's checkpoint layout applied to the float tensors), then each quantized
    module rebuilt from the stored tensors exactly (``QuantLinear``; fused experts packed
    per expert from their per-expert tensors)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise KnowpressError(
            f"{directory}: a compressed-tensors checkpoint; pip install compressed-tensors"
        ) from None
    from knowpress.formats.ct_modules import load_modules

    return load_modules(directory, dtype, trust_remote_code)


@register
class CompressedTensorsFormat(Format):
    name = "hf-compressed-tensors"
    detect_order = 20
    summary = "compressed-tensors (stock transformers, vLLM, SGLang load it)"

    def detect(self, folder: Path) -> bool:
        return is_ct_folder(folder)

    def holds(self, modules: dict[str, Any]) -> str | None:
        if not modules:
            return "no packed module: a plain hf folder holds the model"
        if any(getattr(m, "storage", "") != FORMAT for m in modules.values()):
            return "the quantize stage stored its codes in knowpress's format"
        return blocker(items_of(modules))

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype | None,
             modules: dict[str, Any], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
             ) -> None:  # fmt: skip
        from knowpress.formats.weights import (
            deploy_state,
            packed_tensor_of,
            save_weights,
            set_dtype,
        )

        reason = blocker(items_of(modules), model)
        if reason:
            raise KnowpressError(f"compressed-tensors: {reason}")
        state = deploy_state(model, dtype) if dtype is not None else model.state_dict()
        state = {k: v for k, v in state.items() if packed_tensor_of(k, set(modules)) is None}
        state.update(ct_state(modules))  # codes re-laid out as compressed-tensors stores them
        save_weights(model, folder, state, original_format=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder)
        set_dtype(folder, dtype)
        write_config(folder, model, modules)

    def load(self, location: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        return load_ct(Path(location), dtype, trust_remote_code), tokenizer
