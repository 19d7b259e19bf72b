"""Fused lightning indexer (float and INT8 paths).

Same signatures and semantics as :mod:`llm_kernels.reference.deepseek_v4.indexer` (spec §8).

* ``indexer_query`` / ``indexer_query_int8``: ``q_residual @ wq_bᵀ`` — W8A8 (per-token INT8
  of ``q_residual``, exact int32 VNNI GEMM per head) for a :class:`QuantWeight`, torch for a
  float weight — with the per-head epilogue fused in the same Numba kernel (one head per
  ``prange`` iteration, the head row never leaves L1): dequant, rounding, RoPE, and for
  the INT8 path rounding to bf16, a fast Walsh-Hadamard transform (O(n log n) natural
  order butterflies, scaled ``1/sqrt(n)`` — the reference multiplies by the dense
  Sylvester matrix) and the per-(token, head) INT8 quantisation. ``w`` is a torch GEMM.
* ``indexer_keys_int8``: bf16 rounding -> FWHT -> bf16 -> per-row INT8, one Numba pass.
* ``indexer_scores_int8``: exact INT8 dot products ``q_i8[t,h] · k_i8[c]`` with
  ``vpdpbusd`` register tiles (4 heads x 64 keys, ``kernels.common.x86``): the queries are
  packed once per call as broadcast operands (``u8 = q + 128``); each work item repacks its
  64 keys in L1 into the vector layout (no separate pass over the keys) together with
  their sums that remove the zero point. The whole epilogue
  ``k_scale · Σ_h w·ReLU(q_scale·acc)·IHD^-0.5`` runs on the tile's accumulators,
  vectorised over keys — no [T, IH, N] intermediate. Plain int32 fallback without VNNI.
* ``indexer_scores``: the fp32 dot products through torch's GEMM (the reference's einsum
  = the same oneDNN/MKL matmul), ReLU/scale/head weights/head sum fused in Numba.
* ``indexer_topk``: causal mask + top-k in Numba (``kernels.common.topk``).

Numerics: the reference's elementwise operation order; the head sum follows torch's
reduction order (``sum(dim=1)``: chunks of 16 rows into a cascade, ``column_sums``), so
given identical int32 accumulators the INT8 scores are normally bitwise equal. The FWHT differs from the
dense fp32 Hadamard product in summation order only (a few fp32 ulps), which can move an
INT8 value by one step where it sits on a rounding edge. Every output element is owned
by one ``prange`` iteration: bitwise identical for any thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ...numerics.quant import QuantWeight
from ..common import jit
from ..common.gemm import dot_i8
from ..common.gemm_pack import ACT_OFFSET, zero_point
from ..common.jit import njit_kernel, sized
from ..common.quant import quant_row_f32
from ..common.topk import topk_rows_f32
from ..common.x86_avx2 import int8_bcast_tile
from .stage_shared import (
    column_sums,
    f32_np,
    i64_np,
    fwht,
    hadamard_scale,
    linear_pair,
    rnd,
)
from .w8a8_heads import (
    MODE_ROPE,
    MODE_ROPE_HAD_Q8,
    NO_F,
    NO_Q,
    NO_S,
    check_quant_weight,
    heads_float,
    heads_weight,
    pack_row,
    quantize_activations,
    run_heads_w8a8,
)

__all__ = ["indexer_query", "indexer_scores", "indexer_topk", "indexer_query_int8",
           "indexer_keys_int8", "indexer_scores_int8"]


# --------------------------------------------------------------------------- queries
def _head_weights(x: torch.Tensor, weights_proj: torch.Tensor, n_heads: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """``w = (x @ weights_projᵀ) · IH^-0.5`` (the reference's ``linear`` and scalar multiply;
    a float or INT8 ``weights_proj``, see :func:`.stage_shared.linear_pair`)."""
    w, _ = linear_pair(x, weights_proj, None, dtype)
    w *= np.float32(n_heads ** -0.5)  # torch's float32 tensor x Python-float multiply: the scalar as float32
    return torch.from_numpy(w)


def _query(q_residual, wq_b, cos, sin, n_heads, head_dim, dtype, mode):
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    T = q_residual.shape[0]
    H, HD = int(n_heads), int(head_dim)
    to_bf16 = dtype == torch.bfloat16
    c, s = f32_np(cos), f32_np(sin)
    if c.shape != (T, c.shape[1]) or s.shape != c.shape or 2 * c.shape[1] > HD:
        raise ValueError(f"cos/sin must be [T={T}, RD/2 <= HD/2], got {c.shape} / {s.shape}")
    had = float(hadamard_scale(HD)) if mode == MODE_ROPE_HAD_Q8 else 1.0
    if mode == MODE_ROPE_HAD_Q8:
        out_f, out_q, out_s = NO_F, np.empty((T, H, HD), np.int8), np.empty((T, H), np.float32)
    else:
        out_f, out_q, out_s = np.empty((T, H, HD), np.float32), NO_Q, NO_S
    if T:
        if isinstance(wq_b, QuantWeight):
            qr = f32_np(q_residual)
            check_quant_weight(wq_b, H * HD, qr.shape[1], "wq_b")
            pw = heads_weight(wq_b, HD)
            act = quantize_activations(qr, pw)
            run_heads_w8a8(act, pw, T, H, HD, mode, to_bf16, 0.0, c, s, had, out_f, out_q, out_s)
        else:
            y, _ = linear_pair(q_residual, wq_b, None, dtype)
            heads_float(y, T, H, HD, mode, to_bf16, np.float32(0.0), c, s, np.float32(had),
                        out_f, out_q, out_s)
    return out_f, out_q, out_s


def indexer_query(q_residual: torch.Tensor, x: torch.Tensor, wq_b, weights_proj: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, *, n_heads: int, head_dim: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_query`: q [T, IH, IHD]
    (RoPE on the last RD lanes, ``dtype`` values), w [T, IH] float32."""
    q, _, _ = _query(q_residual, wq_b, cos, sin, n_heads, head_dim, dtype, MODE_ROPE)
    return torch.from_numpy(q), _head_weights(x, weights_proj, n_heads, dtype)


def indexer_query_int8(q_residual: torch.Tensor, x: torch.Tensor, wq_b, weights_proj: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, n_heads: int, head_dim: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_query_int8`:
    q_i8 [T, IH, IHD] int8, q_scale [T, IH, 1] float32, w [T, IH] float32."""
    _, q8, qs = _query(q_residual, wq_b, cos, sin, n_heads, head_dim, dtype, MODE_ROPE_HAD_Q8)
    T = q8.shape[0]
    return (torch.from_numpy(q8), torch.from_numpy(qs).view(T, int(n_heads), 1),
            _head_weights(x, weights_proj, n_heads, dtype))


# --------------------------------------------------------------------------- keys
@njit_kernel(parallel=True)
def _keys_int8(keys, scale, k8, ks):
    N, D = keys.shape
    for r in prange(N):  # one key row per iteration (decode: 0-1 rows, prefill: T/4)
        buf = np.empty(D, np.float32)
        for i in range(D):
            buf[i] = rnd(keys[r, i], True)
        fwht(buf, scale)
        for i in range(D):
            buf[i] = rnd(buf[i], True)
        ks[r] = quant_row_f32(buf, k8[r])


def indexer_keys_int8(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_keys_int8`:
    ``bf16(bf16(k) @ Hadamard)`` -> per-row INT8. Returns k_i8 [N, IHD] int8 and
    k_scale [N, 1] float32."""
    k = f32_np(keys)
    N, D = k.shape
    scale = hadamard_scale(D)
    k8 = np.empty((N, D), np.int8)
    ks = np.empty(N, np.float32)
    if N:
        sized(_keys_int8, k.size * 8)(k, scale, k8, ks)
    return torch.from_numpy(k8), torch.from_numpy(ks).view(N, 1)


# --------------------------------------------------------------------------- scores
_SC_TT = 4                 # query rows (heads) per register tile
_SC_NB = 4                 # 16-key blocks per register tile
_SC_KB = 16 * _SC_NB       # keys per prange work item (one tile width)
_SC_TILE = int8_bcast_tile(_SC_TT, _SC_NB)  # 4 x 64 tile (VNNI: 16 zmm accumulators)
#: Zero point of the process's INT8 tile (128 for VNNI's ``q + 128``, 0 for AVX2's exact ``Σ q·k``).
_SC_ZP = np.int32(zero_point(jit.INT8_TILE))


@njit_kernel
def _score_token(acc, corr, t, c0, nc, qs, w, ks, H, scale, vals, colsum, out):
    """Scores of token ``t`` for keys ``c0 .. c0+nc-1`` from the int32 dot products
    ``acc[h·KB + j]`` (minus the zero-point correction ``corr[j]``):
    ``out[t, c] = fl(ks[c] · Σ_h fl(fl(relu(fl(qs[t,h]·acc)) · scale) · w[t,h]))`` — the
    reference's elementwise order, vectorised over the keys, the head sum in torch's
    order (:func:`column_sums`)."""
    KB = vals.shape[1]
    for h in range(H):
        q_s = qs[t, h]
        wh = w[t, h]
        for j in range(KB):
            v = np.float32(q_s * np.float32(np.int32(acc[h * KB + j] - corr[j])))
            if v <= np.float32(0.0):  # relu; NaN propagates like torch
                v = np.float32(0.0)
            vals[h, j] = np.float32(np.float32(v * scale) * wh)
    column_sums(vals, colsum)
    for j in range(nc):
        out[t, c0 + j] = np.float32(colsum[j] * ks[c0 + j])


@njit_kernel
def _pack_q(q8, T, H, Hp, KG):
    """int8 queries [T·H, D] -> broadcast layout ``[KG][T·Hp][4]`` (the tile's bytes:
    ``q + ACT_OFFSET``); rows ``t·Hp + h``, padding heads/lanes q = 0."""
    RP = T * Hp
    qp = np.full(KG * RP * 4, np.uint8(ACT_OFFSET))
    for t in range(T):
        for h in range(H):
            pack_row(q8[t * H + h], qp, t * Hp + h, RP, KG)
    return qp


@njit_kernel(parallel=True)
def _scores_int8_vnni(k32, qp, T, H, Hp, KG, qs, w, ks, scale, out):
    """Register-tile INT8 scores (VNNI or AVX2 tile, ``jit.INT8_TILE``). ``k32``: the raw
    int8 keys viewed as int32 words [N, KG]; ``qp``:
    :func:`_pack_q`. One block of 64 keys per ``prange`` iteration: the block's keys are
    repacked in L1 into the ``[4][KG][16][4]`` vector layout (+ their sums for the
    ``q + 128`` zero point), then ``T·Hp/4`` register tiles (4 heads x 64 keys) and the
    per-token epilogue."""
    N = k32.shape[0]
    nkb = (N + _SC_KB - 1) // _SC_KB
    xks = T * Hp * 4
    bstride = KG * 64
    for b in prange(nkb):
        c0 = b * _SC_KB
        nc = min(N, c0 + _SC_KB) - c0
        wp32 = np.zeros(_SC_KB * KG, np.int32)
        corr = np.zeros(_SC_KB, np.int32)
        for i in range(nc):
            kr = k32[c0 + i]
            blk = i >> 4
            l = i & 15
            s = np.int32(0)
            for kg in range(KG):
                v = kr[kg]
                wp32[(blk * KG + kg) * 16 + l] = v
                s = np.int32(s + np.int32(np.int8(v)) + np.int32(np.int8(v >> 8))
                             + np.int32(np.int8(v >> 16)) + np.int32(np.int8(v >> 24)))
            corr[i] = np.int32(s * _SC_ZP)
        wp = wp32.view(np.int8)
        acc = np.empty(Hp * _SC_KB, np.int32)
        vals = np.empty((H, _SC_KB), np.float32)
        colsum = np.empty(_SC_KB, np.float32)
        for t in range(T):
            for h0 in range(0, Hp, _SC_TT):
                _SC_TILE(qp, (t * Hp + h0) * 4, xks, wp, 0, bstride, KG, acc, h0 * _SC_KB, _SC_KB, False)
            _score_token(acc, corr, t, c0, nc, qs, w, ks, H, scale, vals, colsum, out)


@njit_kernel(parallel=True)
def _scores_int8_plain(k8, q8, T, H, qs, w, ks, scale, out):
    """Fallback of :func:`_scores_int8_vnni`: plain exact int32 dot products."""
    N = k8.shape[0]
    nkb = (N + _SC_KB - 1) // _SC_KB
    for b in prange(nkb):
        c0 = b * _SC_KB
        nc = min(N, c0 + _SC_KB) - c0
        acc = np.zeros(H * _SC_KB, np.int32)
        corr = np.zeros(_SC_KB, np.int32)
        vals = np.empty((H, _SC_KB), np.float32)
        colsum = np.empty(_SC_KB, np.float32)
        for t in range(T):
            for h in range(H):
                qr = q8[t * H + h]
                for j in range(nc):
                    acc[h * _SC_KB + j] = dot_i8(qr, k8[c0 + j])
            _score_token(acc, corr, t, c0, nc, qs, w, ks, H, scale, vals, colsum, out)


def indexer_scores_int8(q_i8: torch.Tensor, q_scale: torch.Tensor, w: torch.Tensor, k_i8: torch.Tensor,
                        k_scale: torch.Tensor) -> torch.Tensor:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_scores_int8`:
    ``k_scale[c] · Σ_h w[t,h] · ReLU(q_scale[t,h] · (q_i8[t,h] · k_i8[c])) · IHD^-0.5``
    with exact int32 dot products -> [T, N] float32."""
    if q_i8.dtype != torch.int8 or k_i8.dtype != torch.int8:
        raise TypeError(f"int8 inputs expected, got {q_i8.dtype} and {k_i8.dtype}")
    T, H, D = q_i8.shape
    N = k_i8.shape[0]
    if k_i8.shape != (N, D):
        raise ValueError(f"k_i8 must be [N, {D}], got {tuple(k_i8.shape)}")
    out = np.empty((T, N), np.float32)
    if T == 0 or N == 0:
        return torch.from_numpy(out)
    q8 = q_i8.contiguous().numpy().reshape(T * H, D)
    k8 = k_i8.contiguous().numpy()
    qs = f32_np(q_scale).reshape(T, H)
    wf = f32_np(w).reshape(T, H)
    ks = f32_np(k_scale).reshape(N)
    scale = np.float32(D ** -0.5)
    if jit.USE_INT8_TILES:
        KG = -(-D // 4)
        if KG * 4 != D:  # keys/queries are read in 4-byte groups: zero-pad the rows
            k8 = np.ascontiguousarray(np.pad(k8, ((0, 0), (0, KG * 4 - D))))
            q8 = np.ascontiguousarray(np.pad(q8, ((0, 0), (0, KG * 4 - D))))
        Hp = -(-H // _SC_TT) * _SC_TT
        qp = _pack_q(q8, T, H, Hp, KG)
        sized(_scores_int8_vnni, T * H * N * D)(k8.view(np.int32), qp, T, H, Hp, KG, qs, wf, ks, scale, out)
    else:
        sized(_scores_int8_plain, T * H * N * D)(k8, q8, T, H, qs, wf, ks, scale, out)
    return torch.from_numpy(out)


_EPI_KB = 256  # keys per work item of the float epilogue (1 KiB contiguous per head row)


@njit_kernel(parallel=True)
def _scores_float_epi(s, w, T, H, scale, out):
    """``out[t, c] = Σ_h fl(fl(relu(s[t,h,c])·scale)·w[t,h])`` (torch's head-sum order);
    one (token, 256-key block) per iteration, each head row read contiguously."""
    N = s.shape[2]
    nkb = (N + _EPI_KB - 1) // _EPI_KB
    for it in prange(T * nkb):
        t = it // nkb
        c0 = (it - t * nkb) * _EPI_KB
        nc = min(N, c0 + _EPI_KB) - c0
        vals = np.empty((H, nc), np.float32)
        for h in range(H):
            wh = w[t, h]
            row = s[t, h]
            for j in range(nc):
                v = row[c0 + j]
                if v <= np.float32(0.0):  # relu; NaN propagates like torch
                    v = np.float32(0.0)
                vals[h, j] = np.float32(np.float32(v * scale) * wh)
        column_sums(vals, out[t, c0:c0 + nc])


def indexer_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_scores`: [T, N] float32
    ``Σ_h w[t,h] · ReLU(q[t,h]·k[c]) · IHD^-0.5``."""
    T, H, D = q.shape
    N = keys.shape[0]
    out = np.empty((T, N), np.float32)
    if T == 0 or N == 0:
        return torch.from_numpy(out)
    s = torch.einsum("thd,nd->thn", q.float(), keys.float()).contiguous().numpy()
    _scores_float_epi(s, f32_np(w).reshape(T, H), T, H, np.float32(D ** -0.5), out)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- top-k
@njit_kernel
def _mask_future(scores, limit, out):
    T, N = scores.shape
    for t in range(T):
        lim = limit[t]
        for c in range(N):
            out[t, c] = scores[t, c] if c < lim else -np.inf


def indexer_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int) -> torch.Tensor:
    """Fused :func:`llm_kernels.reference.deepseek_v4.indexer.indexer_topk`: [T, min(topk, N)]
    int64 entry indices, best first (ties: lower index first), causally invisible entries
    (``c >= (pos+1) // ratio``) never selected; -1 pads rows with fewer visible entries."""
    T, n = scores.shape
    k = min(int(topk), n)
    if k == 0:
        return torch.empty(T, 0, dtype=torch.int64)
    limit = (i64_np(positions) + 1) // int(ratio)
    masked = np.empty((T, n), np.float32)
    _mask_future(f32_np(scores), limit, masked)
    out = np.empty((T, k), np.int64)
    if T:
        topk_rows_f32(masked, k, out)  # topk_indices' kernel (its checks hold here by construction)
    return torch.from_numpy(out)
