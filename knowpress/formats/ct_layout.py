"""The compressed-tensors tensors of one packed weight, from knowpress's codes and back.

Per quantized module ``P`` (a linear, or one expert's projection in the per-expert checkpoint
layout), by the grid of its codes (``tensors/grids.py``), as compressed-tensors 0.20 writes
them:

- int, ``pack-quantized``: ``P.weight_packed`` int32 ``[out, ⌈in·b/32⌉]`` (32 codes in ``b``
  words, signed: code − 2^(b−1)), ``P.weight_scale`` fp16 ``[out, in/g]``, ``P.weight_shape``
  int64 ``[2]`` and, asymmetric, ``P.weight_zero_point`` int32 ``[⌈out·b/32⌉, in/g]`` (the
  signed zero points packed along the output dimension, ``pack_to_int32(..., packed_dim=0)``);
- fp8, ``float-quantized``: ``P.weight`` float8_e4m3fn ``[out, in]``, ``P.weight_scale`` fp32
  ``[out, 1]`` (channel) or ``[⌈out/g⌉, in/g]`` (``block`` ``[g, g]``);
- nvfp4, ``nvfp4-pack-quantized``: ``P.weight_packed`` uint8 ``[out, in/2]`` (two e2m1 codes a
  byte, low nibble first: knowpress's own 4-bit packing), ``P.weight_scale`` float8_e4m3fn
  ``[out, in/16]``, ``P.weight_global_scale`` fp32 ``[1]``;
- mxfp4, ``mxfp4-pack-quantized``: ``P.weight_packed`` as nvfp4, ``P.weight_scale`` uint8
  (E8M0) ``[out, in/32]``.

Fused 3-D experts are written in the architecture's per-expert checkpoint layout, which
transformers 5 merges into ``gate_up_proj`` / ``down_proj`` while loading: the names come from
its own conversion mapping (:func:`expert_names`), so an architecture without one is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from knowpress.tensors.grids import compact_rows, expand_rows, is_block
from knowpress.tensors.packing import Quantized, pack, packed_width, unpack

FORMATS = {"int": "pack-quantized", "fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized",
           "mxfp4": "mxfp4-pack-quantized"}  # fmt: skip
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
            "weight_global_scale")  # fmt: skip


@dataclass(frozen=True)
class Scheme:
    """The settings one compressed-tensors config group stores (``per_row``: one group per
    row, compressed-tensors' ``channel`` strategy)."""

    grid: str
    bits: int
    group_size: int | None
    symmetric: bool

    def args(self) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        if self.grid == "int":
            return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric,
                                    strategy="group" if self.group_size else "channel",
                                    group_size=self.group_size)  # fmt: skip
        if self.grid == "fp8":
            if self.group_size:
                return QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                        strategy="block",
                                        block_structure=[self.group_size] * 2)  # fmt: skip
            return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        if self.grid == "nvfp4":
            return QuantizationArgs(num_bits=4, type="float", symmetric=True, group_size=16,
                                    strategy="tensor_group",
                                    scale_dtype=torch.float8_e4m3fn)  # fmt: skip
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, group_size=32,
                                strategy="group", scale_dtype=torch.uint8)  # fmt: skip


def scheme_of(grid: str, bits: int, group_size: int, symmetric: bool, in_features: int
              ) -> Scheme:  # fmt: skip
    per_row = group_size == in_features and grid in ("int", "fp8")
    return Scheme(grid, bits, None if per_row else group_size, symmetric)


def read_scheme(weights: dict[str, Any]) -> Scheme | str:
    """The :class:`Scheme` of a config group's ``weights`` args, or why knowpress cannot
    hold it packed."""
    kind, bits = weights.get("type"), int(weights.get("num_bits", 0))
    strategy, group = weights.get("strategy"), weights.get("group_size")
    if weights.get("dynamic") or weights.get("actorder") not in (None, "static"):
        return "dynamic or activation-ordered weights"
    if kind == "int" and strategy in ("group", "channel") and bits in (2, 3, 4, 8):
        return Scheme("int", bits, group if strategy == "group" else None,
                      bool(weights.get("symmetric", True)))  # fmt: skip
    if kind == "float" and bits == 8 and strategy == "channel":
        return Scheme("fp8", 8, None, True)
    if kind == "float" and bits == 8 and strategy == "block":
        rows, cols = weights.get("block_structure") or (0, 0)
        return Scheme("fp8", 8, int(cols), True) if rows == cols else "non-square fp8 blocks"
    if kind == "float" and bits == 4 and strategy == "tensor_group" and group == 16:
        return Scheme("nvfp4", 4, 16, True)
    if kind == "float" and bits == 4 and strategy == "group" and group == 32:
        return Scheme("mxfp4", 4, 32, True)
    return f"{kind} {bits}-bit {strategy} weights"


def entries(
    prefix: str, out: int, n: int, scheme: Scheme
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype tag, shape) of what a module of ``[out, n]`` stores under ``scheme``."""
    g = scheme.group_size or n
    groups = n // g
    if scheme.grid == "int":
        stored = [
            (f"{prefix}.weight_packed", "I32", (out, -(-n * scheme.bits // 32))),
            (f"{prefix}.weight_scale", "F16", (out, groups)),
            (f"{prefix}.weight_shape", "I64", (2,)),
        ]
        if not scheme.symmetric:
            stored.append((f"{prefix}.weight_zero_point", "I32",
                           (-(-out * scheme.bits // 32), groups)))  # fmt: skip
        return stored
    if scheme.grid == "fp8":
        rows = -(-out // g) if is_block("fp8", g, n) else out
        return [(f"{prefix}.weight", "F8_E4M3", (out, n)),
                (f"{prefix}.weight_scale", "F32", (rows, groups))]  # fmt: skip
    tag = "F8_E4M3" if scheme.grid == "nvfp4" else "U8"
    stored = [(f"{prefix}.weight_packed", "U8", (out, packed_width(n, 4))),
              (f"{prefix}.weight_scale", tag, (out, groups))]  # fmt: skip
    if scheme.grid == "nvfp4":
        stored.append((f"{prefix}.weight_global_scale", "F32", (1,)))
    return stored


def tensors(prefix: str, q: Quantized, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The stored tensors of codes ``q`` (unpacked ``[out, n]``, per-row scales)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out, n = q.codes.shape
    g = scheme.group_size or n
    codes, scales = q.codes.cpu(), q.scales.cpu()
    if scheme.grid == "int":
        offset = 2 ** (scheme.bits - 1)
        signed = (codes.to(torch.int16) - offset).to(torch.int8)
        stored = {
            f"{prefix}.weight_packed": pack_to_int32(signed, scheme.bits),
            f"{prefix}.weight_scale": scales.to(torch.float16).reshape(out, -1).clone(),
            f"{prefix}.weight_shape": torch.tensor([out, n]),
        }
        if q.zeros is not None:
            zeros = (q.zeros.cpu().to(torch.int16) - offset).to(torch.int8)
            stored[f"{prefix}.weight_zero_point"] = pack_to_int32(zeros, scheme.bits, packed_dim=0)
        return stored
    if scheme.grid == "fp8":
        scale = compact_rows(scales.float(), "fp8", g, n).clone()
        return {f"{prefix}.weight": codes.view(torch.float8_e4m3fn).clone(),
                f"{prefix}.weight_scale": scale}  # fmt: skip
    stored = {f"{prefix}.weight_packed": pack(codes, 4), f"{prefix}.weight_scale": scales.clone()}
    if scheme.grid == "nvfp4":  # copies: gate and up of one expert share the global scale
        assert q.global_scale is not None
        stored[f"{prefix}.weight_global_scale"] = q.global_scale.cpu().float().reshape(1).clone()
    return stored


def read(raw: Mapping[str, torch.Tensor], prefix: str, scheme: Scheme, n: int) -> Quantized:
    """Inverse of :func:`tensors`: codes ``[out, n]``, per-row scales, zeros, global scale."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scales = raw[f"{prefix}.weight_scale"]
    if scheme.grid == "int":
        out, n = (int(x) for x in raw[f"{prefix}.weight_shape"])
        offset = 2 ** (scheme.bits - 1)
        signed = unpack_from_int32(raw[f"{prefix}.weight_packed"], scheme.bits,
                                   torch.Size([out, n]))  # fmt: skip
        zeros = raw.get(f"{prefix}.weight_zero_point")
        if zeros is not None:
            shape = torch.Size([out, scales.shape[-1]])
            zeros = unpack_from_int32(zeros, scheme.bits, shape, packed_dim=0)
            zeros = (zeros.to(torch.int16) + offset).to(torch.uint8)
        codes = (signed.to(torch.int16) + offset).to(torch.uint8)
        return Quantized(codes, scales.to(torch.float16).reshape(out, -1), zeros)
    if scheme.grid == "fp8":
        weight = raw[f"{prefix}.weight"]
        g = scheme.group_size or n
        per_row = expand_rows(scales.float(), weight.shape[0], "fp8", g, n)
        return Quantized(weight.view(torch.uint8), per_row, None)
    codes = unpack(raw[f"{prefix}.weight_packed"], 4, n)
    return Quantized(codes, scales, None, raw.get(f"{prefix}.weight_global_scale"))


@dataclass(frozen=True)
class ExpertNames:
    """The per-expert checkpoint names transformers merges into an experts module's fused
    tensors: ``gate``/``up`` (rows ``[:I]`` / ``[I:]`` of ``gate_up_proj``), ``down``, and the
    renames from checkpoint to module names (``(checkpoint, model)`` substrings)."""

    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...]

    def prefix(self, module: str) -> str:
        """The checkpoint name of the in-memory experts module ``module``."""
        for checkpoint, model in self.renames:
            module = module.replace(model, checkpoint)
        return module

    def module(self, prefix: str) -> str:
        for checkpoint, model in self.renames:
            prefix = prefix.replace(checkpoint, model)
        return prefix

    def pattern(self) -> str:
        """A ``re:`` target matching every expert projection (checkpoint names)."""
        return rf"re:.*\.experts\.\d+\.({self.gate}|{self.up}|{self.down})$"


def expert_names(model_type: str) -> ExpertNames | str:
    """The per-expert layout transformers' conversion mapping gives ``model_type``, or why
    there is none (a fused layout this transformers loads only as it stores it)."""
    import transformers
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(model_type) or []
    found: dict[str, list[str]] = {}
    renames = []
    for item in mapping:
        sources = list(getattr(item, "_original_source_patterns", []))
        targets = list(getattr(item, "_original_target_patterns", []))
        plain = not re.search(r"[\\()\[\]*+?^$|]", "".join(sources + targets))
        if type(item).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1 and plain:
            renames.append((sources[0], targets[0]))
        for target in targets:
            for fused in ("gate_up_proj", "down_proj"):
                if target.endswith(f"experts.{fused}"):
                    found[fused] = [re.sub(r".*experts\.\*\.(\w+)\.weight$", r"\1", s)
                                    for s in sources]  # fmt: skip
    gate_up, down = found.get("gate_up_proj", []), found.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1:
        return (f"transformers {transformers.__version__} has no per-expert checkpoint layout "
                f"for {model_type} (conversion_mapping), so it cannot load its experts "
                f"from compressed-tensors")  # fmt: skip
    return ExpertNames(gate_up[0], gate_up[1], down[0], tuple(renames))
