"""The GPTQ solver: quantize one weight so the layer's *outputs* on calibration data move least.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023, arXiv:2210.17323). For a linear layer ``y = W x`` with calibration
inputs ``X`` (``[n, in]``), the Hessian of ``‖(W − Ŵ) Xᵀ‖²`` is ``H = 2 XᵀX / n``. Columns are
quantized one at a time; the error ``e = (w − q) / [H⁻¹]_jj`` of column ``j`` is spread over
the columns not yet quantized, ``W[:, j:] −= e · [H⁻¹]_{j, j:}``, using the upper Cholesky
factor of ``H⁻¹`` (blocks of columns are updated lazily). ``damp`` adds ``damp·mean(diag H)``
to the diagonal; inputs that never fire (``H_jj = 0``) get weight 0.

Groups: with ``act_order`` columns go in order of falling ``H_jj`` and group parameters come
from the original weight ("static groups"), so groups stay contiguous in storage order; without
it a group's scale and zero point are computed when its first column is reached, from the
weights as the error feedback left them. The codes and parameters are those of
``grids.quantize`` (same format, same ``QuantLinear``): each column is rounded to the nearest
point of the method's grid (int, fp8, nvfp4 — whose global scale comes from the original
weight —, mxfp4) under its group's scale.
"""

from __future__ import annotations

import torch

from knowpress.tensors.grids import Grid, is_block
from knowpress.tensors.packing import Quantized


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``2 XᵀX / n`` of inputs ``[..., in]`` (float32, ``[in, in]``)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return 2.0 * x.T @ x / max(x.shape[0], 1)


def gptq_quantize(
    weight: torch.Tensor,
    hess: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    grid: str = "int",
) -> Quantized:
    """GPTQ-quantize ``weight`` ``[out, in]`` under Hessian ``hess`` ``[in, in]`` onto ``grid``
    (scales one row per output row: fp8 blocks equal within a block)."""
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    h = hess.detach().float().clone().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = in_features // group_size
    rows = group_size if is_block(grid, group_size, in_features) else None
    quant = Grid(grid, bits, symmetric, rows).bind(w)
    scales = torch.ones(out_features, groups, device=w.device).to(quant.scale_dtype)
    zeros = None if symmetric else torch.zeros(out_features, groups, device=w.device)
    perm = torch.arange(in_features, device=w.device)
    if act_order:
        static_scales, static_zeros = quant.params(w.reshape(out_features, groups, group_size))
        scales, zeros = static_scales, static_zeros
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))  # no [in, in] identity allocated
    upper = _inverse_cholesky(h)
    del h
    codes = _solve(w, upper, perm, scales, zeros, quant, group_size, act_order, block)
    codes = codes[:, torch.argsort(perm)]
    zeros = None if zeros is None else zeros.to(torch.uint8)
    return Quantized(codes, scales, zeros, quant.global_scale)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` (raised damping retried if ``H`` is not positive
    definite in float32)."""
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        lifted = h
        if extra:
            lifted = h.clone()
            lifted.diagonal().add_(extra * torch.mean(torch.diag(h)))
        factor, info = torch.linalg.cholesky_ex(lifted)
        del lifted
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True)
    raise ValueError("GPTQ: the Hessian is not positive definite even with extra damping")


def _solve(
    w: torch.Tensor,
    upper: torch.Tensor,
    perm: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    grid: Grid,
    group_size: int,
    act_order: bool,
    block: int,
) -> torch.Tensor:
    """Column-by-column quantization with error feedback (see the module docstring); fills
    ``scales``/``zeros`` in place for dynamic groups; returns codes in permuted order."""
    out_features, in_features = w.shape
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=w.device)
    block = group_size * max(1, -(-block // group_size))  # whole groups per block
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            group = column // group_size
            if not act_order and (i1 + i) % group_size == 0:
                s, z = grid.params(w1[:, i : i + group_size])
                scales[:, group] = s
                if zeros is not None and z is not None:
                    zeros[:, group] = z
            s_col = scales[:, group]
            z_col = None if zeros is None else zeros[:, group]
            q = grid.encode(w1[:, i], s_col, z_col)
            codes[:, i1 + i] = q
            error = (w1[:, i] - grid.decode(q, s_col, z_col)) / u1[i, i]
            w1[:, i:] -= error.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = error
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return codes
