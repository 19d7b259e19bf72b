"""Fused KV compressors (``compressor_project``, ``compress_windows``).

Same signatures and semantics as :mod:`llm_kernels.reference.deepseek_v4.compressor`
(spec §7): float32 torch tensors holding ``dtype``-rounded values.

* ``compressor_project``: the two GEMMs ``x @ wkvᵀ`` and ``x @ wgateᵀ``: for a single
  token one Numba GEMV over both weights (bf16 widened in registers; measured 1.7x faster
  than torch's oneDNN GEMV here) with the ``ape[pos mod ratio]`` bias added in its
  epilogue; for more tokens torch's GEMM (the reference's ``linear``) and a small Numba
  kernel adding the bias in place.
* ``compress_windows``: one Numba kernel. Phase 1 (``prange`` over (window, 64-channel
  block)): per channel the overlap row assembly (previous window's front halves + this
  window's back halves, read in place — no concatenated copies), the softmax over the
  window rows, the rounded weights and products and their sum. Phase 2 (``prange`` over
  windows): weighted RMSNorm + RoPE at the window start, rounded to ``dtype``.

Numerics: the reference's operation order and rounding points (softmax as
``exp(s − max)`` / ``Σ``; products rounded to ``dtype`` before the row sum; ``Σx²`` in
torch's order). ``exp`` is libm's ``expf`` where torch uses Sleef (both < 1 ulp), so a
weight can differ by an fp32 ulp; after rounding outputs are within a few fp32 ulps
(fp32) or one bf16 ulp (bf16) of the reference. Every output element is owned by one
``prange`` iteration: bitwise identical for any thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ..common.jit import njit_kernel, sized
from .stage_shared import (
    column_sums,
    f32_np,
    i64_np,
    linear_pair,
    norm_weighted,
    rnd,
    rope,
)

__all__ = ["compressor_project", "compress_windows"]

_CB = 64  # channels per phase-1 work item


def compressor_project(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                       positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`llm_kernels.reference.deepseek_v4.compressor.compressor_project`.

    Returns kv [T, coff·d] (``dtype``-rounded) and score [T, coff·d] float32 (gate logits +
    ``ape[pos mod ratio]``)."""
    ratio = ape.shape[0]
    slots = i64_np(positions) % ratio  # numpy: floor-mod like torch's %
    kv, score = linear_pair(x, wkv, wgate, dtype, f32_np(ape), slots)
    return torch.from_numpy(kv), torch.from_numpy(score)


@njit_kernel(parallel=True)
def _compress_kernel(kv, score, pkv, psc, has_prev, overlap, nw, cos, sin, eps, to_bf16, out):
    N, R, C = kv.shape
    d = out.shape[1]
    off = C - d  # lanes of the current window used: [off, off + d) ("back" halves with overlap)
    nrows = 2 * R if overlap else R
    nblk = (d + _CB - 1) // _CB
    pooled = np.empty((N, d), np.float32)
    for it in prange(N * nblk):
        n = it // nblk
        k0 = (it - n * nblk) * _CB
        k1 = min(d, k0 + _CB)
        nk = k1 - k0
        sc = np.empty((nrows, nk), np.float32)
        kr = np.empty((nrows, nk), np.float32)
        r0 = 0
        if overlap:
            for r in range(R):
                for j in range(nk):
                    if has_prev:
                        sc[r, j] = psc[n, r, k0 + j]
                        kr[r, j] = pkv[n, r, k0 + j]
                    else:
                        sc[r, j] = -np.inf
                        kr[r, j] = np.float32(0.0)
            r0 = R
        for r in range(R):
            for j in range(nk):
                sc[r0 + r, j] = score[n, r, off + k0 + j]
                kr[r0 + r, j] = kv[n, r, off + k0 + j]
        m = np.empty(nk, np.float32)
        for j in range(nk):
            m[j] = sc[0, j]
        for r in range(1, nrows):
            for j in range(nk):
                v = sc[r, j]
                if v > m[j]:
                    m[j] = v
        ssum = np.zeros(nk, np.float32)
        for r in range(nrows):
            for j in range(nk):
                e = np.float32(np.exp(np.float32(sc[r, j] - m[j])))
                sc[r, j] = e
                ssum[j] = np.float32(ssum[j] + e)
        for r in range(nrows):
            for j in range(nk):
                w = rnd(np.float32(sc[r, j] / ssum[j]), to_bf16)
                kr[r, j] = rnd(np.float32(kr[r, j] * w), to_bf16)
        acc = np.empty(nk, np.float32)
        column_sums(kr, acc)
        for j in range(nk):
            pooled[n, k0 + j] = rnd(acc[j], to_bf16)
    for n in range(N):  # few windows: serial
        buf = np.empty(d, np.float32)
        for k in range(d):
            buf[k] = pooled[n, k]
        norm_weighted(buf, nw, eps, to_bf16)
        rope(buf, cos[n], sin[n], to_bf16)
        for k in range(d):
            out[n, k] = buf[k]


def compress_windows(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                     prev_score: torch.Tensor | None, norm_w: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *, overlap: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Fused :func:`llm_kernels.reference.deepseek_v4.compressor.compress_windows`.

    kv, score [N, ratio, coff·d]; prev_kv/prev_score [N, ratio, d] or None (overlap only);
    norm_w [d]; cos/sin [N, RD/2] -> [N, d] float32 holding ``dtype`` values."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    N, R, C = kv.shape
    d = C // 2 if overlap else C
    k_np, s_np = f32_np(kv), f32_np(score)
    has_prev = overlap and prev_kv is not None
    if has_prev:
        pk, ps = f32_np(prev_kv), f32_np(prev_score)
        if pk.shape != (N, R, d) or ps.shape != (N, R, d):
            raise ValueError(f"prev_kv/prev_score must be [{N}, {R}, {d}], got {pk.shape} / {ps.shape}")
    else:
        pk = ps = np.zeros((1, 1, 1), np.float32)
    c, s = f32_np(cos), f32_np(sin)
    out = np.empty((N, d), np.float32)
    if N and d:
        kernel = sized(_compress_kernel, k_np.size * 4)
        kernel(k_np, s_np, pk, ps, has_prev, bool(overlap), f32_np(norm_w), c, s,
               np.float32(eps), dtype == torch.bfloat16, out)
    return torch.from_numpy(out)
