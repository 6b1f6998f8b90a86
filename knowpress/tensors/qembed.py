"""Embedding tables stored packed, and output heads tied to them.

At small scale the embedding (and the output head tied to it) is a large share of the bytes:
40% of the quickstart's int4 checkpoint. ``QuantEmbedding`` stores a ``[V, H]`` table as
``QuantLinear`` stores a weight — codes ``weight_packed`` ``[V, ⌈H·b/8⌉]``, fp16
``weight_scale`` ``[V, H/g]``, ``weight_zero_point`` — one row per token, and dequantizes only
the rows a batch looks up. A head tied to the table becomes ``TiedQuantHead``: no tensors of
its own, logits from the dequantized table, so the checkpoint keeps one copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knowpress.tensors.packing import (
    Quantized,
    dequantize_groups,
    pack,
    packed_width,
    unpack,
)


class QuantEmbedding(nn.Module):
    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 symmetric: bool, method: str, padding_idx: int | None,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            num_embeddings, embedding_dim, padding_idx,
        )  # fmt: skip
        self.bits, self.group_size, self.symmetric, self.method = (
            bits,
            group_size,
            symmetric,
            method,
        )
        groups = embedding_dim // group_size
        self.register_buffer(
            "weight_packed",
            torch.zeros(num_embeddings, packed_width(embedding_dim, bits), dtype=torch.uint8),
        )
        self.register_buffer(
            "weight_scale", torch.ones(num_embeddings, groups, dtype=torch.float16)
        )
        if symmetric:
            self.weight_zero_point: torch.Tensor | None = None
        else:
            zeros = torch.zeros(num_embeddings, packed_width(groups, bits), dtype=torch.uint8)
            self.register_buffer("weight_zero_point", zeros)
        self.compute_dtype = dtype

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, padding_idx: int | None, q: Quantized,
                       bits: int, group_size: int, method: str) -> QuantEmbedding:  # fmt: skip
        """The packed form of the table ``weight`` ``[V, H]`` (``q``: its quantized rows)."""
        module = cls(weight.shape[0], weight.shape[1], bits, group_size, q.zeros is None, method,
                     padding_idx, weight.dtype)  # fmt: skip
        module.weight_packed = pack(q.codes, bits)
        module.weight_scale = q.scales.contiguous()
        if q.zeros is not None:
            module.weight_zero_point = pack(q.zeros, bits)
        return module.to(weight.device)

    @classmethod
    def empty_like(cls, embedding: nn.Embedding, spec: dict[str, Any], dtype: torch.dtype
                   ) -> QuantEmbedding:  # fmt: skip
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"],
                   spec["symmetric"], spec["method"], embedding.padding_idx, dtype)  # fmt: skip

    def packing_spec(self) -> dict[str, Any]:
        return {"kind": "embedding", "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method}  # fmt: skip

    def logical_parameters(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def _rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack(self.weight_packed[ids], self.bits, self.embedding_dim)
        zeros = self.weight_zero_point
        if zeros is not None:
            zeros = unpack(zeros[ids], self.bits, self.embedding_dim // self.group_size)
        return dequantize_groups(codes, self.weight_scale[ids], zeros, self.bits,
                                 self.group_size, dtype)  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        ids = torch.arange(self.num_embeddings, device=self.weight_packed.device)
        return self._rows(ids, dtype or self.compute_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self._rows(flat, self.compute_dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)


class TiedQuantHead(nn.Module):
    """An output head whose weight is a ``QuantEmbedding``'s table (logits = x · tableᵀ)."""

    kind = "tied_head"

    def __init__(self, embedding: QuantEmbedding, embedding_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: no second copy
        self.embedding_name = embedding_name

    def packing_spec(self) -> dict[str, Any]:
        return {"kind": "tied_head", "embedding": self.embedding_name}

    def logical_parameters(self) -> int:
        return 0  # counted with the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding.dequantized_weight(x.dtype))


def install_embedding(
    model: nn.Module, name: str, bits: int, group_size: int, symmetric: bool, method: str
) -> QuantEmbedding:
    """Round the embedding at ``name`` (or re-round a packed one) and install it; heads tied
    to it become ``TiedQuantHead``s reading the packed table."""
    from knowpress.tensors.packing import quantize_groups

    current = model.get_submodule(name)
    table = current.dequantized_weight() if isinstance(current, QuantEmbedding) else current.weight
    heads = [
        head_name
        for head_name, module in model.named_modules()
        if head_name != name
        and (getattr(module, "weight", None) is table or _reads(module, current))
    ]
    q = quantize_groups(table.detach(), bits, group_size, symmetric)
    packed = QuantEmbedding.from_quantized(
        table.detach(), current.padding_idx, q, bits, group_size, method
    )
    model.set_submodule(name, packed)
    for head in heads:
        model.set_submodule(head, TiedQuantHead(packed, name))
    return packed


def _reads(module: nn.Module, embedding: nn.Module) -> bool:
    return isinstance(module, TiedQuantHead) and module._embedding is embedding
