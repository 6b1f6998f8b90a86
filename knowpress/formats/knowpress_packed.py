"""The knowpress-packed folder: packed layers that stock transformers must not load silently.

A packed stage folder stores ``weight_packed`` / ``weight_scale`` / ``weight_zero_point``
where transformers expects ``weight``; ``from_pretrained`` would initialise every such layer
at random with only a warning. So the saved ``config.json`` carries ``model_type`` =
:data:`PACKED_MODEL_TYPE`, which ``AutoConfig`` rejects with an error quoting it (it names
knowpress's loader), and keeps the real type in ``knowpress_model_type`` (``auto_map``, which
would bypass the check under ``trust_remote_code``, moves to ``knowpress_auto_map``).
:func:`load_packed` undoes both, builds the model from its config, swaps in a
``QuantLinear`` for every packed module and loads the tensors strictly: any missing tensor
but an output head tied to the embedding is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from knowpress.core.errors import KnowpressError
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE
from knowpress.formats.base import Format, register

QUANT_FILE = "knowpress_quant.json"
PACKED_VERSION = 2  # 2: zero points packed at the code width

PACKED_MODEL_TYPE = (
    "knowpress-packed: stock transformers cannot read these packed weights; load the folder "
    "with knowpress (`compress eval --model DIR`, knowpress.formats.load_model(DIR))"
)
REAL_TYPE_KEY, REAL_AUTO_MAP_KEY = "knowpress_model_type", "knowpress_auto_map"


def mark_packed(config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of a packed folder (see the module docstring)."""
    config = dict(config)
    config[REAL_TYPE_KEY] = config["model_type"]
    config["model_type"] = PACKED_MODEL_TYPE
    if "auto_map" in config:
        config[REAL_AUTO_MAP_KEY] = config.pop("auto_map")
    return config


def packed_config(directory: Path, trust_remote_code: bool) -> PretrainedConfig:
    """The real config of a packed folder."""
    from transformers import CONFIG_MAPPING
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    data = json.loads((directory / "config.json").read_text())
    if not isinstance(data, dict) or REAL_TYPE_KEY not in data:
        raise KnowpressError(
            f"{directory}: packed weights but config.json has no {REAL_TYPE_KEY} (written by an "
            f"older knowpress); re-run the stage that wrote it"
        )
    data["model_type"] = data.pop(REAL_TYPE_KEY)
    auto_map = data.pop(REAL_AUTO_MAP_KEY, None)
    if auto_map is not None:
        data["auto_map"] = auto_map
    if auto_map and "AutoConfig" in auto_map:
        if not trust_remote_code:
            raise KnowpressError(
                f"{directory}: the model's code ships with it (auto_map); set "
                f"model.trust_remote_code: true to run it"
            )
        config_class = get_class_from_dynamic_module(auto_map["AutoConfig"], str(directory))
    elif data["model_type"] in CONFIG_MAPPING:
        config_class = CONFIG_MAPPING[data["model_type"]]
    else:
        raise KnowpressError(
            f"{directory}: model type {data['model_type']!r} is unknown to transformers "
            f"(upgrade it, or set model.trust_remote_code for custom code)"
        )
    config = config_class.from_dict(data)
    config._name_or_path = str(directory)
    return config


def packed_skeleton(
    directory: Path, dtype: torch.dtype, trust_remote_code: bool
) -> PreTrainedModel:
    """The folder's model with a ``QuantLinear`` for every packed module, weights unset (on
    the current default device: the meta device gives shapes without memory)."""
    from knowpress.tensors.qembed import QuantEmbedding, TiedQuantHead
    from knowpress.tensors.qexperts import install
    from knowpress.tensors.qlinear import QuantLinear

    try:
        plan = json.loads((directory / QUANT_FILE).read_text())
        modules = plan["modules"] if plan.get("version") == PACKED_VERSION else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        modules = None
    if not isinstance(modules, dict):
        raise KnowpressError(
            f"{directory}: {QUANT_FILE} is not a packing plan this knowpress reads (version "
            f"{PACKED_VERSION}); re-run the stage that wrote it"
        )
    config = packed_config(directory, trust_remote_code)
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    heads = {name: spec for name, spec in modules.items() if spec.get("kind") == "tied_head"}
    for name, spec in modules.items():
        module = model.get_submodule(name)
        kind = spec.get("kind", "linear")
        if kind == "fused_experts":
            for tensor, tensor_spec in spec["tensors"].items():
                install(module, tensor, tensor_spec, None)
        elif kind == "embedding":
            model.set_submodule(name, QuantEmbedding.empty_like(module, spec, dtype))
        elif kind == "linear":
            model.set_submodule(name, QuantLinear.empty_like(module, spec, dtype=dtype))
    for name, spec in heads.items():  # after the embeddings they read
        model.set_submodule(name, TiedQuantHead(model.get_submodule(spec["embedding"]),
                                                spec["embedding"]))  # fmt: skip
    return model


def load_packed(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The folder's model, its tensors read one shard at a time (``shards.shard_states``)."""
    from knowpress.formats.shards import shard_states

    model = packed_skeleton(directory, dtype, trust_remote_code)
    expected, seen, unexpected = list(model.state_dict()), set(), []
    for state in shard_states(directory):
        unexpected += model.load_state_dict(state, strict=False).unexpected_keys
        seen.update(state)
    tied = set(model.all_tied_weights_keys)  # empty unless the config ties them
    missing = [k for k in expected if k not in seen and k not in tied]
    if missing or unexpected:
        raise KnowpressError(
            f"{directory}: packed checkpoint does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run the stage with --force"
        )
    if not any(getattr(m, "kind", None) == "tied_head" for m in model.modules()):
        model.tie_weights()  # a TiedQuantHead already reads its packed table
    return model.eval()


@register
class PackedFormat(Format):
    """Only for what no public format holds (``compressed_tensors.blocker``: embeddings,
    experts with zero points or on nvfp4, per-expert widths, ...) or what a stage asked to
    keep here (``format: knowpress``): the manifest's ``format_reason`` names the case."""

    name = "hf-packed"
    detect_order = 10
    summary = "knowpress's packed folder (what no public format holds)"

    def detect(self, folder: Path) -> bool:
        return (Path(folder) / QUANT_FILE).is_file()

    def holds(self, modules: dict[str, Any]) -> str | None:
        return None if modules else "no packed module: a plain hf folder holds the model"

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype | None,
             modules: dict[str, Any], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
             ) -> None:  # fmt: skip
        from knowpress.core.io import atomic_write_text
        from knowpress.formats.weights import deploy_state, save_weights

        state = deploy_state(model, dtype) if dtype is not None else None
        save_weights(
            model,
            folder,
            state,
            original_format=False,  # in-memory tensor names
            max_shard_size=max_shard_size,
        )
        tokenizer.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        plan = {name: module.packing_spec() for name, module in modules.items()}
        payload = {"format": "knowpress-packed", "version": PACKED_VERSION, "modules": plan}
        atomic_write_text(folder / QUANT_FILE, json.dumps(payload, indent=1, sort_keys=True))
        text = json.dumps(mark_packed(config), indent=2, sort_keys=True) + "\n"
        atomic_write_text(folder / "config.json", text)

    def load(self, location: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
        from transformers import AutoTokenizer

        path = Path(location)
        config = packed_config(path, trust_remote_code)  # the marked config.json is not it
        tokenizer = AutoTokenizer.from_pretrained(location, config=config,
                                                  trust_remote_code=trust_remote_code)  # fmt: skip
        return load_packed(path, dtype, trust_remote_code), tokenizer
