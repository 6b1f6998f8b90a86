"""``gear``: quantization + a low-rank fix of its error + sparse outliers kept exactly (Kang
et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM", arXiv:2403.05527).

Each chunk ``X`` (keys or values of ``n`` tokens, one ``[n, D]`` matrix per KV head) is
stored as ``X ≈ D̂ + L + S``:

- ``S``: the ``outliers`` share of the entries of largest ``|X|``, kept in fp16 with their
  flat indices (int16 when ``n·D < 2^15``, else int32);
- ``D̂``: KIVI's ``bits``-wide quantization of ``X − S`` (keys per channel in blocks of
  ``group_size`` tokens, values per token in groups of ``group_size`` channels, ``kivi.py``);
- ``L = A·B``: the rank-``rank`` truncated SVD of the residual ``X − S − D̂``, ``A [n, r]``
  and ``B [r, D]`` in fp16.

Chunks stream as KIVI's do: the newest ``residual`` tokens wait in full precision, whole
groups beyond them are encoded once. With ``rank: 0`` and ``outliers: 0`` GEAR is KIVI.

```yaml
runtime policy: {name: gear, bits: 4, rank: 4, outliers: 0.02, group_size: 32, residual: 128}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from knowpress.methods.kv.base import KV_POLICIES
from knowpress.methods.kv.kivi import KIVILayer, KIVIPolicy, _nbytes

Sparse = tuple[torch.Tensor, torch.Tensor]  # fp16 values, flat indices [B, H, k]
LowRank = tuple[torch.Tensor, torch.Tensor]  # A [B, H, n, r], B [B, H, r, D] (fp16)


def split_outliers(x: torch.Tensor, share: float) -> tuple[torch.Tensor, Sparse | None]:
    """``x [B, H, n, D]`` minus its largest-magnitude ``share`` of entries per head, and those
    entries (values, flat indices); no outliers when ``share · n · D < 1``."""
    b, h, n, d = x.shape
    k = int(share * n * d)
    if k == 0:
        return x, None
    flat = x.reshape(b, h, n * d)
    index = flat.abs().topk(k, dim=-1).indices
    values = flat.gather(-1, index)
    inliers = flat.scatter(-1, index, torch.zeros_like(values)).reshape(b, h, n, d)
    small = torch.int16 if n * d < 2**15 else torch.int32
    return inliers, (values.half(), index.to(small))


def add_outliers(x: torch.Tensor, sparse: Sparse | None) -> torch.Tensor:
    if sparse is None:
        return x
    b, h, n, d = x.shape
    values, index = sparse
    flat = x.reshape(b, h, n * d).clone()
    flat.scatter_(-1, index.long(), values.to(x.dtype))
    return flat.reshape(b, h, n, d)


def low_rank(residual: torch.Tensor, rank: int) -> LowRank | None:
    """Truncated SVD ``A = U_r·Σ_r``, ``B = V_rᵀ`` of each head's ``[n, D]`` residual."""
    r = min(rank, *residual.shape[-2:])
    if r == 0:
        return None
    u, sigma, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return (u[..., :r] * sigma[..., None, :r]).half(), vh[..., :r, :].half()


class GEARLayer(KIVILayer):
    def __init__(self, bits: int, group: int, residual: int, rank: int, outliers: float) -> None:
        super().__init__(bits, group, residual)
        self.rank, self.outliers = rank, outliers

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[Any, ...]:  # fmt: skip
        """KIVI's chunk of the inliers, then per K and V the outliers and low-rank factors;
        pads (``valid [B, 1, n]`` false) are zeros: never outliers, no part of the SVD."""
        real = torch.ones_like(keys[..., :1], dtype=torch.bool)
        if valid is not None:
            real = valid.to(torch.bool)[..., None]
            keys, values = keys.masked_fill(~real, 0.0), values.masked_fill(~real, 0.0)
        k_in, k_sparse = split_outliers(keys, self.outliers)
        v_in, v_sparse = split_outliers(values, self.outliers)
        chunk = super().encode(k_in, v_in, valid)
        k_hat, v_hat = super().decode(chunk, keys.dtype)
        k_err, v_err = ((k_in - k_hat) * real, (v_in - v_hat) * real)
        return (*chunk, low_rank(k_err, self.rank), low_rank(v_err, self.rank),
                k_sparse, v_sparse)  # fmt: skip

    def decode(self, chunk: tuple[Any, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        keys, values = super().decode(chunk[:2], dtype)
        out = []
        for x, factors, sparse in ((keys, chunk[2], chunk[4]), (values, chunk[3], chunk[5])):
            if factors is not None:
                x = x + (factors[0].float() @ factors[1].float()).to(dtype)
            out.append(add_outliers(x, sparse))
        return tuple(out)

    def chunk_bytes(self, chunk: tuple[Any, ...]) -> int:
        extra = [t for part in chunk[2:] if part is not None for t in part]
        return super().chunk_bytes(chunk) + sum(_nbytes(t) for t in extra)


@KV_POLICIES.register("gear")
class GEARPolicy(KIVIPolicy):
    summary = "KIVI quantization + low-rank residual (rank r) + sparse exact outliers (s%)"
    paper = "Kang et al. 2024 (GEAR), arXiv:2403.05527"

    name: Literal["gear"]  # type: ignore[assignment]
    bits: Literal[2, 3, 4] = 4
    rank: int = Field(4, ge=0, description="rank of the residual's low-rank fix per head")
    outliers: float = Field(0.02, ge=0, lt=1, description="share of entries kept exactly")

    def layer(self) -> GEARLayer:
        return GEARLayer(self.bits, self.group_size, self.residual, self.rank, self.outliers)
