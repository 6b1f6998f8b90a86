"""One view of every supported sparse-MoE block (transformers 5: fused expert tensors).

Each block holds a router ``gate`` (``weight [E, H]``; DeepSeek-V3 adds the selection-only
``e_score_correction_bias [E]``), its ``top_k`` and ``norm_topk_prob``, the fused experts
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``act_fn``) and, for some
architectures, always-on shared experts (never pruned). ``MoEBlock.route`` gives a token's
scores over all experts (router softmax, or DeepSeek's sigmoid), the chosen ids and their
combine weights exactly as the model computes them; ``expert_output`` is ``f_j(x)`` before
the combine weight. ``keep_experts`` slices one block; ``set_expert_counts`` records the new
counts in the config (uniform) or returns the per-layer structure the manifest keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from knowpress.core.errors import KnowpressError


@dataclass(frozen=True)
class Arch:
    count_key: str  # config field holding the routed-expert count
    scoring: Literal["softmax", "sigmoid"]
    shared: tuple[str, ...] = ()  # always-on shared-expert modules of a block


ARCHITECTURES: dict[str, Arch] = {
    "mixtral": Arch("num_local_experts", "softmax"),
    "qwen2_moe": Arch("num_experts", "softmax", ("shared_expert", "shared_expert_gate")),
    "qwen3_moe": Arch("num_experts", "softmax"),
    "olmoe": Arch("num_experts", "softmax"),
    "deepseek_v3": Arch("n_routed_experts", "sigmoid", ("shared_experts",)),
}


@dataclass(frozen=True)
class Routing:
    """A block's routing of ``N`` tokens: ``scores [N, E]`` (softmax or sigmoid over every
    expert), ``index [N, k]`` chosen experts, ``weight [N, k]`` their combine weights."""

    scores: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


@dataclass
class MoEBlock:
    layer: int
    name: str
    block: nn.Module
    arch: Arch

    @property
    def router(self) -> nn.Module:
        return self.block.gate  # type: ignore[no-any-return]

    @property
    def experts(self) -> nn.Module:
        return self.block.experts  # type: ignore[no-any-return]

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def groups(self) -> int:
        """Expert groups of a grouped router (DeepSeek-V3's ``n_group``; 1 otherwise)."""
        return int(getattr(self.router, "num_group", None) or 1)

    def group_problem(self, keep: int) -> str | None:
        """Why keeping ``keep`` experts breaks this block's grouped routing, or None. The
        router takes the 2 best of each contiguous group and ``topk_group`` groups."""
        g = self.groups
        if g == 1:
            return None
        per = keep // g
        if keep % g or per < 2 or int(self.router.topk_group) * per < self.top_k:
            return (f"{self.name}: {keep} experts do not fit its grouped router (n_group {g}, "
                    f"topk_group {self.router.topk_group}, top-k {self.top_k}): keep a "
                    f"multiple of {g} with at least 2 per group")  # fmt: skip
        return None

    @property
    def shared(self) -> list[nn.Module]:
        return [getattr(self.block, n) for n in self.arch.shared if hasattr(self.block, n)]

    def route(self, x: torch.Tensor) -> Routing:
        """Routing of ``x [N, H]`` through this block's own router."""
        logits, weight, index = self.router(x.to(self.router.weight.dtype))
        logits = logits.float()
        scores = logits.sigmoid() if self.arch.scoring == "sigmoid" else logits.softmax(-1)
        return Routing(scores, index, weight.float())

    def expert_output(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """``f_j(x) = down_j(act(gate_j x) · up_j x)``: ``[n, H]`` for ``x [n, H]``."""
        from knowpress.tensors.qexperts import current_weight

        gate_up = current_weight(self.experts, "gate_up_proj")[j].to(x.dtype)
        down = current_weight(self.experts, "down_proj")[j].to(x.dtype)
        return expert_mlp(self.experts, gate_up, down, x)


def expert_mlp(experts: nn.Module, gate_up: torch.Tensor, down: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One expert's ``down · (act(gate x) ⊙ up x)`` with the given ``[2I, H]``, ``[H, I]``
    matrices (the experts module supplies the activation)."""
    gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return nn.functional.linear(experts.act_fn(gate) * up, down)


def arch_of(config: Any) -> Arch:
    """The adapter of ``config.model_type``; an unsupported one is a clear error."""
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise KnowpressError(
            f"model_type {kind!r} is not a sparse-MoE architecture knowpress supports "
            f"({', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[kind]


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every routed-expert block of ``model``, in layer order (dense layers are skipped)."""
    arch = arch_of(model.config)
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if hasattr(module, "gate") and _fused(experts):
            found = re.search(r"layers\.(\d+)\.", name + ".")
            blocks.append(MoEBlock(int(found.group(1)) if found else len(blocks), name, module,
                                   arch))  # fmt: skip
    if not blocks:
        raise KnowpressError(f"{type(model).__name__}: no fused MoE block found")
    return blocks


def _fused(experts: Any) -> bool:
    names = {n for n, _ in experts.named_parameters()} if isinstance(experts, nn.Module) else ()
    packed = isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj_packed")
    return ({"gate_up_proj", "down_proj"} <= set(names)) or packed


def keep_experts(block: MoEBlock, keep: list[int]) -> None:
    """Keep experts ``keep`` (ascending ids) of ``block``: router rows (and correction
    bias), fused tensors and both modules' counts, consistently. Fewer than top-k: error."""
    if len(keep) < block.top_k:
        raise KnowpressError(
            f"{block.name}: keeping {len(keep)} experts leaves fewer than top-k "
            f"({block.top_k}); lower the sparsity"
        )
    if sorted(set(keep)) != list(keep) or not 0 <= keep[0] <= keep[-1] < block.num_experts:
        raise KnowpressError(f"{block.name}: expert ids {keep} are not ascending and in range")
    problem = block.group_problem(len(keep))
    if problem:
        raise KnowpressError(problem)
    size = block.num_experts // block.groups
    per_group = [sum(1 for j in keep if j // size == g) for g in range(block.groups)]
    if len(set(per_group)) > 1:
        raise KnowpressError(
            f"{block.name}: keeping {per_group} experts per group would move experts between "
            "the router's groups; keep the same number in each"
        )
    ids = torch.tensor(keep, device=block.router.weight.device)
    router, experts = block.router, block.experts
    with torch.no_grad():
        router.weight = nn.Parameter(router.weight[ids].clone())
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            router.e_score_correction_bias = bias[ids].clone()
        for name in ("gate_up_proj", "down_proj"):
            if name not in dict(experts.named_parameters()):
                raise KnowpressError(f"{block.name}: prune experts before quantizing them")
            setattr(experts, name, nn.Parameter(getattr(experts, name)[ids].clone()))
    router.num_experts = experts.num_experts = len(keep)


def set_expert_counts(model: nn.Module, counts: list[int]) -> dict[str, Any]:
    """Record the blocks' counts in the config: one count for all -> the config's field
    (stock transformers loads it); uneven -> the config keeps the largest and the returned
    manifest structure ``{"experts_per_layer": counts}`` tells knowpress's loader."""
    arch = arch_of(model.config)
    setattr(model.config, arch.count_key, max(counts))
    return {} if len(set(counts)) == 1 else {"experts_per_layer": list(counts)}


def shrink_to(model: nn.Module, counts: list[int]) -> None:
    """Slice a model built from a config with the largest count to ``counts`` (the first
    experts of each block): the shapes a saved uneven model's tensors have."""
    blocks = moe_blocks(model)
    if len(blocks) != len(counts):
        raise KnowpressError(
            f"structure.experts_per_layer has {len(counts)} entries but the model has "
            f"{len(blocks)} MoE blocks; the artifact is inconsistent: re-run its stage"
        )
    for block, n in zip(blocks, counts, strict=True):
        if n != block.num_experts:
            keep_experts(block, list(range(n)))


def load_uneven(path: Any, counts: list[int], dtype: torch.dtype,
                trust_remote_code: bool) -> nn.Module:  # fmt: skip
    """A saved model whose blocks keep ``counts`` experts. transformers builds the model
    from its config (which holds the largest count) and then loads and converts the
    checkpoint's tensors; a subclass cuts the blocks (``shrink_to``) in between, so stock
    ``from_pretrained`` fills the right shapes (same class name: same key conversions)."""
    from transformers import AutoConfig

    from knowpress.arch.layers import built_with

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    uneven = built_with(config, lambda model: shrink_to(model, counts))
    if uneven is None:
        raise KnowpressError(f"{path}: no causal-LM class for {type(config).__name__}")
    model = uneven.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.eval()  # type: ignore[no-any-return]
