"""Students: the model a distill stage trains, made from the teacher (or the current model).

- ``copy``: the model itself (healing after pruning or quantization-aware edits).
- ``config``: the same architecture with config fields overridden (``num_hidden_layers``,
  ``hidden_size``, ``intermediate_size``, ...), randomly initialised (seeded).
- ``depth``: the ``keep`` share of decoder layers, dropping the layers whose Block Influence
  ``BI_l = 1 − E[cos(h_in, h_out)]`` on calibration tokens is lowest (Men et al. 2024,
  ShortGPT, arXiv:2403.03853): a layer that barely turns its input is cheap to lose.
- ``width``: per layer, the ``mlp_keep`` share of MLP channels and ``heads_keep`` share of
  attention heads ranked by activation importance on calibration tokens (Muralidharan et al.
  2024, Minitron, arXiv:2407.14679): channel ``c``: ``E|act_fn(gate_c(x)) · up_c(x)|``;
  head ``h``: ``E‖o_h‖₂``, the norm of its output before ``o_proj``. Rows and columns of
  ``gate/up/down`` and ``q/k/v/o`` are sliced directly (torch-pruning's dependency graph
  hangs on attention heads); with grouped-query attention each KV group keeps the same
  number of query heads, so ``num_key_value_heads`` stays and the group size shrinks.

The student is an ordinary transformers model of its own (smaller) config.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError, yaml_value


class StudentSpec(FrozenConfig):
    """``from``: how the student is made (see the module docstring)."""

    make: Literal["copy", "config", "depth", "width"] = "copy"
    config: dict[str, Any] = Field(default_factory=dict, description="config overrides (config)")
    keep: float | None = Field(None, gt=0, le=1, description="share of layers kept (depth)")
    mlp_keep: float = Field(1.0, gt=0, le=1, description="share of MLP channels kept (width)")
    heads_keep: float = Field(1.0, gt=0, le=1, description="share of heads kept (width)")
    seed: int = 0


#: config fields that count something (layers, heads, channels): whole numbers >= 1
_COUNT = re.compile(r"num_.*|.*_(size|dim|heads|layers|experts|per_tok|positions|embeddings)")


def _override_problem(key: str, value: Any, current: Any) -> str | None:
    """Why ``value`` cannot replace the config field ``key`` (now ``current``), or None:
    the same YAML type as the model's own value (an int field takes whole numbers, a float
    field numbers, a bool field true/false), and counts at least 1."""
    where = f"student.config.{key}"
    if _COUNT.fullmatch(key) and isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{where}: expected a whole number >= 1, got {yaml_value(value)}"
        return None
    if current is None or value is None:
        return None
    wanted = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,),
              dict: (dict,)}.get(type(current))  # fmt: skip
    if wanted is None:
        return None
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        shown = yaml_value(current)
        return f"{where}: expected a value like the model's own {shown}, got {yaml_value(value)}"
    return None


def check_student(spec: StudentSpec, config: Any) -> str | None:
    """Why ``spec`` cannot be made from a model of ``config``, or None (no weights needed)."""
    if spec.make == "config":
        unknown = [k for k in spec.config if not hasattr(config, k)]
        if unknown:
            return f"student.config: {unknown[0]!r} is not a field of {type(config).__name__}"
        if not spec.config:
            return "student.config: give the fields to change (e.g. num_hidden_layers: 1)"
        for key, value in spec.config.items():
            problem = _override_problem(key, value, getattr(config, key))
            if problem:
                return problem
    if spec.make == "depth" and spec.keep is None:
        return "student.keep: the share of layers to keep is required for make: depth"
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if spec.make == "width" and experts:
        return "student.make: width pruning handles dense MLPs; for MoE use make: depth or config"
    return None


def forward_problem(model_class: Any, config: Any) -> str | None:
    """Why a ``model_class`` of ``config`` cannot run a 4-token forward (built and run on
    the meta device: shapes only, no memory), or None."""
    from knowpress.core.errors import error_summary

    try:
        with torch.device("meta"):
            model_class(config)(input_ids=torch.zeros((1, 4), dtype=torch.long))
    except Exception as exc:  # shape mismatches transformers' config checks let through
        return error_summary(exc)
    return None


def student_config(spec: StudentSpec, config: Any) -> Any:
    """The student's config, from the shapes alone (what ``make_student`` will build)."""
    config = copy.deepcopy(config)
    if spec.make == "config":
        for key, value in spec.config.items():
            setattr(config, key, value)
    elif spec.make == "depth":
        assert spec.keep is not None
        config.num_hidden_layers = max(1, round(config.num_hidden_layers * spec.keep))
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
    elif spec.make == "width":
        heads, d = config.num_attention_heads, _head_dim(config)
        kv = getattr(config, "num_key_value_heads", None) or heads
        group = heads // kv
        mha = kv == heads
        kept = (
            max(1, round(heads * spec.heads_keep))
            if mha
            else kv * max(1, round(group * spec.heads_keep))
        )
        config.head_dim, config.num_attention_heads = d, kept
        config.num_key_value_heads = kept if mha else kv
        config.intermediate_size = max(1, round(config.intermediate_size * spec.mlp_keep))
    return config


def make_student(
    spec: StudentSpec, model: PreTrainedModel, batches: list[torch.Tensor]
) -> PreTrainedModel:
    """The student from ``model`` (not changed); ``batches``: calibration ids ``[B, T]``."""
    problem = check_student(spec, model.config)
    if problem:
        raise KnowpressError(problem)
    if spec.make == "config":
        config = copy.deepcopy(model.config)
        for key, value in spec.config.items():
            setattr(config, key, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            student = type(model)(config)
        student.generation_config = copy.deepcopy(model.generation_config)
        return student.to(next(model.parameters()).device)
    student = copy.deepcopy(model)
    if spec.make == "depth":
        assert spec.keep is not None
        influence = block_influence(student, batches)
        n = student_config(spec, model.config).num_hidden_layers
        keep = sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:n])
        drop_layers(student, keep)
    elif spec.make == "width":
        channels, heads = width_importance(student, batches)
        prune_width(student, channels, heads, student_config(spec, model.config))
    return student


def _layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.model.layers  # type: ignore[return-value]


@torch.no_grad()
def block_influence(model: PreTrainedModel, batches: list[torch.Tensor]) -> list[float]:
    """``1 − mean cos(h_in, h_out)`` per decoder layer over the calibration tokens."""
    sums = [0.0] * len(_layers(model))
    count = 0
    model.eval()
    for ids in batches:
        out = model(input_ids=ids, output_hidden_states=True)
        states = out.hidden_states  # embeddings, then each layer's output (last normed)
        for i in range(len(sums)):
            a, b = states[i].flatten(0, 1), states[i + 1].flatten(0, 1)
            sums[i] += float((1 - nn.functional.cosine_similarity(a, b, dim=-1)).sum())
        count += ids.numel()
    return [s / max(1, count) for s in sums]


def drop_layers(model: PreTrainedModel, keep: list[int]) -> None:
    """Keep decoder layers ``keep`` (in order); renumber their attention ``layer_idx``."""
    layers = _layers(model)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    model.model.layers = kept
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)


@torch.no_grad()
def width_importance(
    model: PreTrainedModel, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: MLP channel importance ``[I]`` and attention head importance ``[H]``."""
    layers = _layers(model)
    channels = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    heads = [torch.zeros(model.config.num_attention_heads) for _ in layers]
    head_dim = _head_dim(model.config)
    hooks = []
    for i, layer in enumerate(layers):

        def mlp_hook(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            channels[i] += args[0].abs().flatten(0, -2).sum(0).float().cpu()

        def head_hook(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            per_head = args[0].unflatten(-1, (-1, head_dim))  # [B, T, H, d]
            heads[i] += per_head.norm(dim=-1).flatten(0, 1).sum(0).float().cpu()

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook))
    try:
        model.eval()
        for ids in batches:
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return channels, heads


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _slice_linear(
    linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    weight = linear.weight.data
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out = out.to(device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data if rows is None else linear.bias.data[rows])
    return out


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    return scores.topk(n).indices.sort().values


def prune_width(
    model: PreTrainedModel, channels: list[torch.Tensor], heads: list[torch.Tensor], target: Any
) -> None:
    """Slice every layer to its most important channels and heads, to the shapes of
    ``target`` (``student_config``); the model's config takes them."""
    config = model.config
    n_heads, d = config.num_attention_heads, _head_dim(config)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    group, mha = n_heads // n_kv, n_kv == n_heads
    inter, kept_heads = target.intermediate_size, target.num_attention_heads
    per_group = kept_heads // n_kv
    for layer, c_score, h_score in zip(_layers(model), channels, heads, strict=True):
        mlp, attn = layer.mlp, layer.self_attn
        keep_c = _top(c_score, inter).to(mlp.down_proj.weight.device)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, keep_c, None)
        mlp.up_proj = _slice_linear(mlp.up_proj, keep_c, None)
        mlp.down_proj = _slice_linear(mlp.down_proj, None, keep_c)
        if mha:
            keep_h = _top(h_score, kept_heads)
            keep_kv = keep_h
        else:  # the best ``per_group`` query heads inside each KV group
            grouped = h_score.view(n_kv, group)
            keep_h = torch.cat([g * group + _top(grouped[g], per_group) for g in range(n_kv)])
            keep_kv = torch.arange(n_kv)
        q_rows = _head_rows(keep_h, d).to(attn.q_proj.weight.device)
        kv_rows = _head_rows(keep_kv, d).to(attn.q_proj.weight.device)
        attn.q_proj = _slice_linear(attn.q_proj, q_rows, None)
        attn.k_proj = _slice_linear(attn.k_proj, kv_rows, None)
        attn.v_proj = _slice_linear(attn.v_proj, kv_rows, None)
        attn.o_proj = _slice_linear(attn.o_proj, None, q_rows)
        attn.num_key_value_groups = kept_heads // len(keep_kv)
        if hasattr(attn, "head_dim"):
            attn.head_dim = d
    for key in ("head_dim", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(config, key, getattr(target, key))  # head_dim explicit: hidden / heads no longer


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
