"""compressed-tensors ``pack-quantized`` folders: packed checkpoints stock transformers loads.

With the ``compressed-tensors`` package installed, ``AutoModelForCausalLM.from_pretrained``
reads these folders with no knowpress import (and vLLM / SGLang serve them): each quantized
``nn.Linear`` stores ``weight_packed`` (int32 words, 32 codes in ``bits`` words, dense),
``weight_scale`` (fp16 ``[out, in/g]``) and ``weight_shape`` (int64 ``[2]``), and
``config.json`` carries the ``quantization_config`` naming each group's bits and group size.
knowpress writes them from its ``QuantLinear`` codes (no re-quantization) and reads them back
into ``QuantLinear``s, so later stages re-save them packed and what is measured is what is
stored: stock transformers' decompression and ``QuantLinear`` give the same weights.

What the format cannot hold here, and so stays in knowpress's packed format (``packed.py``,
the reason recorded in the stage details): fused 3-D MoE expert tensors and embedding tables
(no transformers-loadable layout), and asymmetric zero points (compressed-tensors 0.20's packed
zero points fail to load in transformers 5.23 with a shape mismatch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knowpress.core.errors import KnowpressError
from knowpress.formats.base import Format, register

FORMAT = "compressed-tensors"


def blocker(modules: Iterable[tuple[str, nn.Module]]) -> str | None:
    """Why these packed modules cannot be stored as compressed-tensors (None: they can)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return "the compressed-tensors package is not installed (pip install compressed-tensors)"
    for name, module in modules:
        kind = getattr(module, "kind", "fused_experts" if hasattr(module, "_packed_specs") else "")
        if kind != "linear":
            return f"{name} is a packed {kind or 'module'}, which compressed-tensors cannot hold"
        if not module.symmetric:  # type: ignore[union-attr]
            return (
                f"{name} has asymmetric zero points (compressed-tensors 0.20's do not load in "
                f"transformers 5.23)"
            )
    return None


def entries(prefix: str, out_features: int, in_features: int, bits: int, group_size: int
            ) -> list[tuple[str, str, tuple[int, ...]]]:  # fmt: skip
    """(name, dtype tag, shape) of what a compressed-tensors linear stores."""
    words = -(-in_features * bits // 32)
    return [
        (f"{prefix}.weight_packed", "I32", (out_features, words)),
        (f"{prefix}.weight_scale", "F16", (out_features, in_features // group_size)),
        (f"{prefix}.weight_shape", "I64", (2,)),
    ]


def _config(modules: dict[str, nn.Module]) -> dict[str, Any]:
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    # A group as wide as the row is the "channel" strategy: a 128-wide group is per-row on
    # q_proj but grouped on a 512-wide down_proj, so the two go in different config groups.
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, module in modules.items():
        key = (module.bits, module.group_size, module.group_size == module.in_features)
        groups.setdefault(key, []).append(name)  # type: ignore[arg-type]
    schemes = {}
    for i, ((bits, group, per_row), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                                strategy="channel" if per_row else "group",
                                group_size=None if per_row else group)  # fmt: skip
        schemes[f"group_{i}"] = QuantizationScheme(targets=names, weights=args,
                                                   format="pack-quantized")  # fmt: skip
    config = QuantizationConfig(config_groups=schemes, format="pack-quantized",
                                quantization_status="compressed")  # fmt: skip
    return {"version": compressed_tensors.__version__, "quant_method": FORMAT,
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(exclude={"quant_method"})}  # fmt: skip


def ct_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of every packed linear (from its codes)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from knowpress.tensors.packing import unpack

    state = {}
    for name, q in modules.items():
        codes = unpack(q.weight_packed, q.bits, q.in_features).to(torch.int16)  # type: ignore[arg-type]
        signed = (codes - 2 ** (q.bits - 1)).to(torch.int8)  # type: ignore[operator]
        state[f"{name}.weight_packed"] = pack_to_int32(signed.cpu(), q.bits)  # type: ignore[arg-type]
        scale = q.weight_scale.to(torch.float16)  # type: ignore[union-attr]
        if q.group_size == q.in_features:
            scale = scale.reshape(-1, 1)
        state[f"{name}.weight_scale"] = scale.cpu()
        state[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features])
    return state


def write_config(directory: Path, modules: dict[str, nn.Module]) -> None:
    """Add the ``quantization_config`` to the folder's config.json."""
    from knowpress.core.io import atomic_write_text

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = _config(modules)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_ct_folder(directory: Path) -> bool:
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == FORMAT


def _matches(targets: list[str], name: str, module: nn.Module) -> bool:
    """compressed-tensors target matching: a module name, a class name, or ``re:`` regex."""
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], name):
                return True
        elif target in (name, type(module).__name__):
            return True
    return False


def _quant_linear(linear: nn.Module, raw: dict[str, torch.Tensor], name: str, bits: int,
                  group_size: int | None, dtype: torch.dtype) -> nn.Module:  # fmt: skip
    """The ``QuantLinear`` holding the codes and scales stored for ``name``."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from knowpress.tensors.packing import pack
    from knowpress.tensors.qlinear import QuantLinear

    out_features, in_features = (int(x) for x in raw[f"{name}.weight_shape"])
    g = int(group_size or in_features)
    spec = {"in_features": in_features, "out_features": out_features, "bits": bits,
            "group_size": g, "symmetric": True, "bias": linear.bias is not None,
            "method": FORMAT}  # fmt: skip
    module = QuantLinear.empty_like(linear, spec, dtype=dtype)
    signed = unpack_from_int32(raw[f"{name}.weight_packed"], bits,
                               torch.Size([out_features, in_features]))  # fmt: skip
    codes = (signed.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    module.weight_packed.copy_(pack(codes, bits))
    module.weight_scale.copy_(raw[f"{name}.weight_scale"].reshape(out_features, -1))
    if linear.bias is not None:
        module.bias.data.copy_(linear.bias.data)
    module.storage = FORMAT
    device = next((t.device for t in (*linear.parameters(), *linear.buffers())), None)
    return module if device is None else module.to(device)


def load_ct(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A compressed-tensors folder loaded as stock transformers loads it (every conversion of
    the architecture's checkpoint layout applied), its quantized linears then rebuilt as
    ``QuantLinear``s from the stored codes, exactly."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise KnowpressError(
            f"{directory}: a compressed-tensors checkpoint; pip install compressed-tensors"
        ) from None
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        output_loading_info=True,
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would run these randomly initialised
        raise KnowpressError(
            f"{directory}: {len(missing)} weight(s) of this architecture are not in the "
            f"checkpoint (first: {missing[0]}); its layout is not one this transformers loads "
            f"(e.g. per-expert names from an older MoE export)"
        )
    raw: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith((".weight_packed", ".weight_scale", ".weight_shape")):
                    raw[key] = handle.get_tensor(key)
    quant = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
    groups = list(quant["config_groups"].values())
    for name in sorted({k.rsplit(".", 1)[0] for k in raw if k.endswith(".weight_packed")}):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise KnowpressError(
                f"{directory}: packed tensor {name} names no module of "
                f"{type(model).__name__} (a checkpoint layout this transformers does not load)"
            ) from None
        group = next((g for g in groups if _matches(g["targets"], name, linear)), None)
        if group is None:
            raise KnowpressError(f"{directory}: {name} is packed but no config group targets it")
        weights = group["weights"]
        if weights.get("type") != "int" or not weights.get("symmetric", True):
            raise KnowpressError(f"{directory}: only symmetric int pack-quantized groups load here")
        model.set_submodule(name, _quant_linear(linear, raw, name, int(weights["num_bits"]),
                                                weights.get("group_size"), dtype))  # fmt: skip
    # The modules are knowpress's now: transformers' quantizer would rewrite any later save
    # from its own (decompressed) view, and save_model writes the config itself.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()


@register
class CompressedTensorsFormat(Format):
    name = "hf-compressed-tensors"
    detect_order = 20
    summary = "compressed-tensors pack-quantized (stock transformers, vLLM, SGLang load it)"

    def detect(self, folder: Path) -> bool:
        return is_ct_folder(folder)

    def holds(self, modules: dict[str, Any]) -> str | None:
        if not modules:
            return "no packed module: a plain hf folder holds the model"
        if any(getattr(m, "storage", "") != FORMAT for m in modules.values()):
            return "the quantize stage stored its codes in knowpress's format"
        return blocker(modules.items())

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype | None,
             modules: dict[str, Any]) -> None:  # fmt: skip
        from knowpress.formats.weights import (
            deploy_state,
            packed_tensor_of,
            save_weights,
            set_dtype,
        )

        state = deploy_state(model, dtype) if dtype is not None else model.state_dict()
        state = {k: v for k, v in state.items() if packed_tensor_of(k, set(modules)) is None}
        state.update(ct_state(modules))  # codes re-packed as compressed-tensors words
        save_weights(model, folder, state, original_format=True)
        tokenizer.save_pretrained(folder)
        set_dtype(folder, dtype)
        write_config(folder, modules)

    def load(self, location: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        return load_ct(Path(location), dtype, trust_remote_code), tokenizer
