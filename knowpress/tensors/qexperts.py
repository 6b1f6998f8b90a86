"""Fused MoE expert tensors stored packed, expert by expert.

transformers 5 keeps all experts of a block in 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, each ``[E, out, in]`` read as ``F.linear(x, W[e])``). Packing one
replaces the parameter by buffers ``{name}_packed`` uint8 ``[E, out, ⌈in·b/8⌉]``,
``{name}_scale`` fp16 ``[E, out, in/g]`` and ``{name}_zero_point`` uint8 (asymmetric; packed
at the code width), each expert with its own scales — the format of ``QuantLinear``, one
matrix per expert. The module's class is swapped for a subclass whose attribute ``name`` is a
property returning the dequantized ``[E, out, in]`` tensor, so the model's own expert forward
(eager, ``batched_mm``, ``grouped_mm``) runs unchanged on what is stored.

Float grids (``spec["grid"]``: fp8 per channel, nvfp4, mxfp4; ``grids.py``): the scales in the
grid's scale dtype and, for nvfp4, ``{name}_global_scale`` fp32 ``[E]`` (each expert's own).

Per-expert bits (``spec["expert_bits"]``, a bit width per expert, from an MoE bit plan): the
codes and zero points of all experts are one flat uint8 buffer, expert ``e`` occupying the
next ``out · packed_width(in, b_e)`` bytes (zero points: ``out · packed_width(groups, b_e)``);
the scales keep their ``[E, out, groups]`` shape. ``spec["bits"]`` is then the widest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from knowpress.tensors.grids import Grid, dequantize, scale_dtype
from knowpress.tensors.packing import (
    Quantized,
    dequantize_groups,
    pack,
    packed_width,
    unpack,
)

SPECS = "_packed_specs"
# An eager expert loop reads ``W[e]`` once per expert hit: during one forward the dequantized
# tensor is kept in this attribute (opened and dropped by hooks), not rebuilt E times.
CACHE = "_dequantized_in_forward"


def is_packed_buffer(attr: str) -> bool:
    return attr.endswith(("_packed", "_scale", "_zero_point"))


def packed_names(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Packed fused tensors of ``module`` (name -> spec), empty when none."""
    return dict(getattr(module, SPECS, {}) or {})


def _property(name: str) -> property:
    def get(self: nn.Module) -> torch.Tensor:
        cache = getattr(self, CACHE, None)
        if cache is None:
            return dequantized(self, name)
        if name not in cache:  # inside a forward: dequantized once, whatever the loop reads
            cache[name] = dequantized(self, name)
        return cache[name]  # type: ignore[no-any-return]

    return property(get)


def _open_cache(module: nn.Module, _args: Any) -> None:
    setattr(module, CACHE, {})


def _close_cache(module: nn.Module, _args: Any, _out: Any) -> None:
    setattr(module, CACHE, None)


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _packed_class(base: type, names: tuple[str, ...]) -> type:
    """A subclass of ``base`` where each of ``names`` reads its packed buffers (one class
    per base and names)."""
    key = (base, names)
    if key not in _CLASSES:
        attrs: dict[str, Any] = {n: _property(n) for n in names}
        attrs["logical_parameters"] = _logical_parameters
        attrs["packing_spec"] = _packing_spec
        _CLASSES[key] = type(f"Packed{base.__name__}", (base,), attrs)
    return _CLASSES[key]


def _logical_parameters(self: nn.Module) -> int:
    specs = packed_names(self)
    packed = sum(s["experts"] * s["out_features"] * s["in_features"] for s in specs.values())
    return packed + sum(p.numel() for p in self.parameters(recurse=False))


def _packing_spec(self: nn.Module) -> dict[str, Any]:
    return {"kind": "fused_experts", "tensors": packed_names(self)}


def _base_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if cls.__name__.startswith("Packed") and packed_names(module) else cls


def expert_bits(spec: dict[str, Any]) -> list[int]:
    """The bit width of each expert of a packed fused tensor."""
    return list(spec.get("expert_bits") or [spec["bits"]] * spec["experts"])


def _flat_sizes(spec: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Bytes of each expert's codes and of its zero points in the flat (mixed) layout."""
    out, n, g = spec["out_features"], spec["in_features"], spec["group_size"]
    bits = expert_bits(spec)
    return [out * packed_width(n, b) for b in bits], [out * packed_width(n // g, b) for b in bits]


def joined(parts: list[Quantized]) -> Quantized:
    """Experts quantized one by one as one ``Quantized`` (codes ``[E·out, in]``; nvfp4: the
    global scales ``[E]``)."""
    zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
    globals_ = None
    if parts[0].global_scale is not None:
        globals_ = torch.cat([p.global_scale.reshape(1) for p in parts])  # type: ignore[union-attr]
    return Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                     zeros, globals_)  # fmt: skip


def _empty_buffers(spec: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    e, out, n = spec["experts"], spec["out_features"], spec["in_features"]
    groups, bits = n // spec["group_size"], spec["bits"]
    grid = spec.get("grid", "int")
    if grid != "int":
        buffers = {
            "_packed": torch.zeros(e, out, packed_width(n, bits), dtype=torch.uint8, device=device),
            "_scale": torch.ones(e, out, groups, device=device).to(scale_dtype(grid)),
        }
        if grid == "nvfp4":
            buffers["_global_scale"] = torch.ones(e, dtype=torch.float32, device=device)
        return buffers
    if spec.get("expert_bits"):
        codes, zeros = _flat_sizes(spec)
        mixed = {
            "_packed": torch.zeros(sum(codes), dtype=torch.uint8, device=device),
            "_scale": torch.ones(e, out, groups, dtype=torch.float16, device=device),
        }
        if not spec["symmetric"]:
            mixed["_zero_point"] = torch.zeros(sum(zeros), dtype=torch.uint8, device=device)
        return mixed
    buffers = {
        "_packed": torch.zeros(e, out, packed_width(n, bits), dtype=torch.uint8, device=device),
        "_scale": torch.ones(e, out, groups, dtype=torch.float16, device=device),
    }
    if not spec["symmetric"]:
        width = packed_width(groups, bits)
        buffers["_zero_point"] = torch.zeros(e, out, width, dtype=torch.uint8, device=device)
    return buffers


def install(module: nn.Module, name: str, spec: dict[str, Any],
            q: Quantized | list[Quantized] | None) -> None:  # fmt: skip
    """Replace ``module.name`` by its packed form (``q``: codes ``[E·out, in]``, scales and
    zeros as ``quantize_groups`` returns them, or with ``expert_bits`` one ``Quantized`` per
    expert; None: empty buffers to load a state dict into)."""
    current = module._parameters.get(name)
    device = current.device if current is not None else _device(module)
    if current is not None:
        module._packed_dtype = current.dtype  # what the property hands the expert forward
        del module._parameters[name]
    generation = packed_names(module).get(name, {}).get("generation", 0) + 1
    specs = {**packed_names(module), name: {**spec, "generation": generation}}
    module.__class__ = _packed_class(_base_class(module), tuple(sorted(specs)))
    setattr(module, SPECS, specs)
    setattr(module, CACHE, None)
    if not getattr(module, "_dequantize_hooks", False):
        module.register_forward_pre_hook(_open_cache)
        module.register_forward_hook(_close_cache)
        module._dequantize_hooks = True
    for suffix, tensor in _empty_buffers(spec, device).items():
        module.register_buffer(name + suffix, tensor)
    if q is None:
        return
    if isinstance(q, list):
        _fill_mixed(module, name, spec, q)
        return
    e, out = spec["experts"], spec["out_features"]
    getattr(module, f"{name}_packed").copy_(pack(q.codes, spec["bits"]).reshape(e, out, -1))
    getattr(module, f"{name}_scale").copy_(q.scales.reshape(e, out, -1))
    if q.zeros is not None:
        zeros = pack(q.zeros, spec["bits"]).reshape(e, out, -1)
        getattr(module, f"{name}_zero_point").copy_(zeros)
    if q.global_scale is not None:
        getattr(module, f"{name}_global_scale").copy_(q.global_scale.reshape(e))


def _fill_mixed(module: nn.Module, name: str, spec: dict[str, Any],
                experts: list[Quantized]) -> None:  # fmt: skip
    bits = expert_bits(spec)
    packed = torch.cat([pack(q.codes, b).reshape(-1) for q, b in zip(experts, bits, strict=True)])
    getattr(module, f"{name}_packed").copy_(packed)
    getattr(module, f"{name}_scale").copy_(torch.stack([q.scales for q in experts]))
    if not spec["symmetric"]:
        zeros = [pack(q.zeros, b).reshape(-1) for q, b in zip(experts, bits, strict=True)]  # type: ignore[arg-type]
        getattr(module, f"{name}_zero_point").copy_(torch.cat(zeros))


def _dequantized_mixed(module: nn.Module, name: str, spec: dict[str, Any],
                       dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    out, n, g = spec["out_features"], spec["in_features"], spec["group_size"]
    code_sizes, zero_sizes = _flat_sizes(spec)
    codes = torch.split(getattr(module, f"{name}_packed"), code_sizes)
    zeros = (torch.split(getattr(module, f"{name}_zero_point"), zero_sizes)
             if not spec["symmetric"] else [None] * len(code_sizes))  # fmt: skip
    scales = getattr(module, f"{name}_scale")
    experts = []
    for e, b in enumerate(expert_bits(spec)):
        c = unpack(codes[e].reshape(out, -1), b, n)
        z = None if zeros[e] is None else unpack(zeros[e].reshape(out, -1), b, n // g)
        experts.append(dequantize_groups(c, scales[e], z, b, g, dtype))
    return torch.stack(experts)


def dequantized(module: nn.Module, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[E, out, in]`` float tensor the packed buffers of ``name`` hold."""
    spec = packed_names(module)[name]
    if spec.get("expert_bits"):
        compute = dtype or getattr(module, "_packed_dtype", torch.float32)
        return _dequantized_mixed(module, name, spec, compute)
    e, out, n = spec["experts"], spec["out_features"], spec["in_features"]
    bits, g = spec["bits"], spec["group_size"]
    codes = unpack(getattr(module, f"{name}_packed").reshape(e * out, -1), bits, n)
    scales = getattr(module, f"{name}_scale").reshape(e * out, -1)
    grid = spec.get("grid", "int")
    if grid != "int":
        compute = dtype or getattr(module, "_packed_dtype", torch.float32)
        globals_ = getattr(module, f"{name}_global_scale", None)
        if globals_ is not None:
            globals_ = globals_.float().repeat_interleave(out).reshape(e * out, 1)
        weight = dequantize(codes, scales, None, Grid(grid, bits, True, None, globals_), g, compute)
        return weight.reshape(e, out, n)
    zeros = None
    if not spec["symmetric"]:
        zeros = unpack(getattr(module, f"{name}_zero_point").reshape(e * out, -1), bits, n // g)
    compute = dtype or getattr(module, "_packed_dtype", torch.float32)
    return dequantize_groups(codes, scales, zeros, bits, g, compute).reshape(e, out, n)


def current_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The float ``[E, out, in]`` tensor now behind ``module.name``: the parameter, or what its
    packed buffers hold (an earlier stage's codes, re-quantized from as stored)."""
    param = module._parameters.get(name)
    return param.detach() if param is not None else dequantized(module, name).detach()


def entries(
    name: str, shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool,
    per_expert: list[int] | None = None, grid: str = "int",
) -> list[tuple[str, str, tuple[int, ...]]]:  # fmt: skip
    """(name, dtype tag, shape) of the buffers a packed fused tensor stores (``per_expert``:
    the mixed layout's flat buffers)."""
    e, out, n = shape
    groups = n // group_size
    if grid != "int":
        tag = {"fp8": "F32", "nvfp4": "F8_E4M3", "mxfp4": "U8"}[grid]
        floats = [
            (f"{name}_packed", "U8", (e, out, packed_width(n, bits))),
            (f"{name}_scale", tag, (e, out, groups)),
        ]
        return [*floats, (f"{name}_global_scale", "F32", (e,))] if grid == "nvfp4" else floats
    if per_expert:
        spec = {"experts": e, "out_features": out, "in_features": n, "group_size": group_size,
                "bits": max(per_expert), "expert_bits": per_expert}  # fmt: skip
        codes, zeros = _flat_sizes(spec)
        mixed = [
            (f"{name}_packed", "U8", (sum(codes),)),
            (f"{name}_scale", "F16", (e, out, groups)),
        ]
        return mixed if symmetric else [*mixed, (f"{name}_zero_point", "U8", (sum(zeros),))]
    out_entries = [
        (f"{name}_packed", "U8", (e, out, packed_width(n, bits))),
        (f"{name}_scale", "F16", (e, out, groups)),
    ]
    if not symmetric:
        out_entries.append((f"{name}_zero_point", "U8", (e, out, packed_width(groups, bits))))
    return out_entries


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def spec_for(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, method: str,
    per_expert: list[int] | None = None, grid: str = "int",
) -> dict[str, Any]:  # fmt: skip
    e, out, n = weight.shape
    spec = {"experts": e, "out_features": out, "in_features": n, "bits": bits,
            "group_size": group_size, "symmetric": symmetric, "method": method}  # fmt: skip
    if grid != "int":
        spec["grid"] = grid
    if per_expert:
        if len(per_expert) != e:
            raise ValueError(f"{len(per_expert)} expert bit widths for {e} experts")
        spec.update(bits=max(per_expert), expert_bits=list(per_expert))
    return spec
