"""Q4_K blocks written here: the ``gguf`` package dequantizes K-quants but does not quantize
them (``gguf.quants.quantize`` raises ``NotImplementedError`` for Q2_K..Q6_K).

Layout (ggml's ``block_q4_K``, 144 bytes per 256 values): ``d`` and ``dmin`` (float16), 12
bytes of 6-bit sub-block scales ``sc[0..7]`` and mins ``m[0..7]`` (bytes 0-3: ``sc[0..3]``
in the low 6 bits, bits 4-5 of ``sc[4..7]`` in the top 2; bytes 4-7: the same for ``m``;
bytes 8-11: ``sc[4..7] & 15`` low nibble, ``m[4..7] & 15`` high nibble), then 128 bytes of
4-bit codes: byte ``32c + l`` holds code ``64c + l`` (low nibble) and ``64c + 32 + l``
(high nibble). Value ``i`` of sub-block ``j``: ``d·sc[j]·q[i] − dmin·m[j]``.

The codes follow ggml's ``quantize_row_q4_K_ref`` (``make_qkx2_quants``: weighted least
squares over 21 candidate scales per sub-block of 32, weights ``rms + |x|``, then the
sub-block scales and mins quantized to 6 bits against the superblock's largest), vectorised
in float32 numpy: the same layout and the same choices up to float summation order.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = 144


def _sum(x: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis (the C loops' order)."""
    return np.cumsum(x, axis=-1, dtype=np.float32)[..., -1]


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even, as an integer."""
    return np.rint(x).astype(np.int64)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0,
               rdelta: float = 0.1, nstep: int = 20) -> tuple[np.ndarray, ...]:  # fmt: skip
    """``make_qkx2_quants`` over rows ``x [M, 32]`` with weights ``w``: (scale [M], the_min [M]
    (>= 0: values are ``scale·L − the_min``), codes L [M, 32])."""
    f32 = np.float32
    low = np.minimum(x.min(axis=-1), f32(0))
    high = x.max(axis=-1)
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    flat = high == low
    span = np.where(flat, f32(1), high - low)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax) / span
        scale = f32(1) / iscale
        codes = np.clip(_nearest(iscale[:, None] * (x - low[:, None])), 0, nmax)
        diff = scale[:, None] * codes + low[:, None] - x
        best = _sum(w * diff * diff)
        for step in range(nstep + 1):  # min moves with the best candidate, as in ggml
            span = np.where(flat, f32(1), high - low)
            iscale = f32(rmin + rdelta * step + nmax) / span
            aux = np.clip(_nearest(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(f32)
            sum_l = _sum(w * aux)
            sum_l2 = _sum(w * aux * aux)
            sum_xl = _sum(w * aux * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, f32(0), this_min)
            diff = this_scale[:, None] * aux + this_min[:, None] - x
            error = _sum(w * diff * diff)
            better = (det > 0) & (error < best) & ~flat
            codes = np.where(better[:, None], aux.astype(np.int64), codes)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-low).astype(f32), codes


def _six_bits(value: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``uint8_t l = nearest_int(inverse·value); l = MIN(63, l)`` (uint8 wraps negatives)."""
    return np.minimum(_nearest(inverse[:, None] * value) & 0xFF, 63).astype(np.uint8)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks of a float array whose last axis is a multiple of 256: uint8
    ``[..., last // 256 * 144]`` (what ``GGUFWriter.add_tensor(..., raw_dtype=Q4_K)`` takes)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, not {values.shape[-1]}")
    f32 = np.float32
    x = values.reshape(-1, 8, 32)
    blocks = x.shape[0]
    rms = np.sqrt(_sum(x * x)[..., None] / f32(32))
    scale, the_min, codes = _make_qkx2(x.reshape(-1, 32), (rms + np.abs(x)).reshape(-1, 32))
    scale, the_min = scale.reshape(blocks, 8), the_min.reshape(blocks, 8)
    codes = codes.reshape(blocks, 8, 32)
    max_scale = np.maximum(scale.max(axis=-1), f32(0))
    max_min = np.maximum(the_min.max(axis=-1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    ls, lm = _six_bits(scale, inv_scale), _six_bits(the_min, inv_min)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    step = d.astype(f32)[:, None] * ls.astype(f32)  # [blocks, 8]
    offset = dmin.astype(f32)[:, None] * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = _nearest((x + offset[..., None]) / step[..., None])
    codes = np.where(step[..., None] != 0, np.clip(fresh, 0, 15), codes).astype(np.uint8)
    out = pack_q4_k(d, dmin, ls, lm, codes)
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * BLOCK_BYTES)


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray,
              codes: np.ndarray) -> np.ndarray:  # fmt: skip
    """Q4_K blocks ``[n, 144]`` from ``d`` / ``dmin`` (float16 ``[n]``), 6-bit sub-block
    ``scales`` / ``mins`` (``[n, 8]``) and 4-bit ``codes`` (``[n, 8, 32]``): the layout of
    the module docstring."""
    blocks = d.shape[0]
    scales, mins = scales.astype(np.uint8), mins.astype(np.uint8)
    packed = np.empty((blocks, 12), dtype=np.uint8)
    packed[:, 0:4] = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (scales[:, 4:] & 0xF) | ((mins[:, 4:] & 0xF) << 4)
    halves = codes.astype(np.uint8).reshape(blocks, 4, 2, 32)  # 64-value chunks: low, high
    nibbles = halves[:, :, 0, :] | (halves[:, :, 1, :] << 4)
    return np.concatenate(
        [d.astype(np.float16)[:, None].view(np.uint8),
         dmin.astype(np.float16)[:, None].view(np.uint8), packed, nibbles.reshape(blocks, 128)],
        axis=-1,
    )  # fmt: skip
