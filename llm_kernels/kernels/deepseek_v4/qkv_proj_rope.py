"""Fused Q / KV projection + norms + RoPE (``qkv_proj_rope``), and the per-head W8A8
GEMM driver shared with :mod:`.indexer`.

Same signature and semantics as :func:`llm_kernels.reference.deepseek_v4.qkv_proj_rope.
qkv_proj_rope` (spec §6). Pipeline for ``T`` tokens:

1. ``x @ wq_aᵀ`` and ``x @ wkvᵀ``: for one token a Numba GEMV over both weights in one
   parallel loop (bandwidth bound; bf16 widened in registers; 1.7-3.6x faster than
   torch's oneDNN GEMV here, see ``GEMV_MAX_T``), for more tokens torch's GEMM (the
   reference's ``linear``; oneDNN's AVX512_BF16 kernel wins once the GEMM is not purely
   bandwidth bound).
2. One Numba kernel (``_qkv_pre``), token by token (tiny work): weighted RMSNorm of
   the q latent (-> ``q_residual``), and, when ``wq_b`` is a :class:`QuantWeight`, its
   per-token INT8 quantisation straight into the packed VNNI activation layout; weighted
   RMSNorm + RoPE of the kv row.
3. One Numba kernel over heads (``heads_vnni``, or ``heads_generic`` without VNNI / for a
   float ``wq_b``), one ``prange`` iteration per head: the head's ``HD`` output columns of the W8A8 GEMM
   (exact int32, VNNI ``vpdpbusd`` register tiles over the head's contiguous packed weight
   block), dequant, then the per-head epilogue in registers/L1 — unweighted RMSNorm, RoPE,
   rounding to ``dtype`` — written once to ``q``. With a float ``wq_b`` the GEMM is the
   step-1 GEMV/GEMM and the same epilogue runs over its output.

Numerics follow the reference operation by operation (float32 math, the same rounding
points, products rounded before sums, no FMA contraction, ``Σx²`` in torch's AVX-512 sum
order), so with torch's GEMM the outputs are normally bitwise equal to the reference; the
single-token Numba GEMV sums in another order (a few fp32 ulps; after rounding to bf16
about 0.1 % of values move by one bf16 ulp). W8A8 dequant is ``fl(fl(acc·s_x)·s_w)`` like
the golden; int32 accumulators are exact.

Determinism: every output element is owned by one ``prange`` iteration (output channels
in step 1, heads in step 3; step 2 is serial); no parallel float reductions -> bitwise
identical for any thread count.

Shared helpers live in :mod:`.stage_shared` (GEMV, epilogues, FWHT) and
:mod:`.w8a8_heads` (the per-head W8A8 kernels and the packed ``wq_b``: prepared at load by
:mod:`.prepare`, or packed for the call when an unprepared ``QuantWeight`` is passed).
"""

from __future__ import annotations

import numpy as np
import torch

from ...numerics.quant import QuantWeight
from ..common.gemm import DUMMY_I32, padded_tokens, w8a8_rows_f32
from ..common.gemm_pack import is_tiled
from ..common.jit import njit_kernel, sized
from ..common.prepared import stage_group
from .stage_shared import PairPack, f32_np, linear_pair, norm_weighted, rope, split_round
from .w8a8_heads import (
    MODE_QNORM_ROPE,
    NO_I8,
    NO_Q,
    NO_S,
    NO_U8,
    check_quant_weight,
    heads_float,
    heads_weight,
    pack_pad,
    padded_rows,
    quant_into,
    heads_vnni,
    run_heads_w8a8,
)

__all__ = ["qkv_proj_rope"]


@njit_kernel
def _qkv_pre(aq, akv, qnw, kvnw, cos, sin, eps, to_bf16, qmode, TP, KG, qres, kv, xp, xq, sx):
    """Per token: q latent RMSNorm (-> ``qres``) [+ INT8 quant/pack of it]; kv RMSNorm +
    RoPE (-> ``kv``)."""
    T, QL = aq.shape
    HD = akv.shape[1]
    for t in range(T):
        buf = np.empty(QL, np.float32)
        for i in range(QL):
            buf[i] = aq[t, i]
        norm_weighted(buf, qnw, eps, to_bf16)
        for i in range(QL):
            qres[t, i] = buf[i]
        quant_into(buf, qmode, t, TP, KG, xp, xq, sx)
        kb = np.empty(HD, np.float32)
        for i in range(HD):
            kb[i] = akv[t, i]
        norm_weighted(kb, kvnw, eps, to_bf16)
        rope(kb, cos[t], sin[t], to_bf16)
        for i in range(HD):
            kv[t, i] = kb[i]
    if qmode == 1:
        pack_pad(xp, T, TP, KG)


def qkv_proj_rope(x: torch.Tensor, wq_a: torch.Tensor, q_norm_w: torch.Tensor, wq_b,
                  wkv: torch.Tensor, kv_norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  *, num_heads: int, head_dim: int, eps: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused :func:`llm_kernels.reference.deepseek_v4.qkv_proj_rope.qkv_proj_rope`.

    Args/returns: as the reference (x [T, D]; wq_a [QL, D]; q_norm_w [QL]; wq_b
    [H·HD, QL] float tensor or :class:`QuantWeight` (W8A8); wkv [HD, D]; kv_norm_w [HD];
    cos/sin [T, RD/2]) -> q [T, H, HD], kv [T, HD], q_residual [T, QL], float32 tensors
    holding ``dtype`` values."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    T = x.shape[0]
    H, HD = int(num_heads), int(head_dim)
    to_bf16 = dtype == torch.bfloat16
    prog = _program_weights(x, wq_a, wkv, wq_b, H, HD)
    if prog is not None:
        return _qkv_int8(x, prog, q_norm_w, kv_norm_w, cos, sin, H, HD, eps, to_bf16)
    aq, akv = linear_pair(x, wq_a, wkv, dtype)
    QL = aq.shape[1]
    c, s = f32_np(cos), f32_np(sin)
    if c.shape != (T, c.shape[1]) or s.shape != c.shape or 2 * c.shape[1] > HD:
        raise ValueError(f"cos/sin must be [T={T}, RD/2 <= HD/2], got {c.shape} / {s.shape}")
    qnw, kvnw = f32_np(q_norm_w), f32_np(kv_norm_w)
    qres = np.empty((T, QL), np.float32)
    kv = np.empty((T, HD), np.float32)
    q = np.empty((T, H, HD), np.float32)
    eps32 = np.float32(eps)
    if isinstance(wq_b, QuantWeight):
        check_quant_weight(wq_b, H * HD, QL, "wq_b")
        pw = heads_weight(wq_b, HD)
        sx = np.empty(T, np.float32)
        if is_tiled(pw.layout):
            TP = padded_rows(T)
            xp = np.empty(pw.kp * TP, np.uint8)
            _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 1, TP, pw.kp // 4, qres, kv, xp,
                     NO_I8, sx)
            act = (xp, sx, TP)
        else:
            xq = np.empty((T, QL), np.int8)
            _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 2, T, 1, qres, kv, NO_U8, xq, sx)
            act = (xq, sx, T)
        if T:
            run_heads_w8a8(act, pw, T, H, HD, MODE_QNORM_ROPE, to_bf16, eps, c, s, 1.0, q,
                           NO_Q, NO_S)
    else:
        _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 0, T, 1, qres, kv, NO_U8, NO_I8,
                 np.empty(1, np.float32))
        y, _ = linear_pair(torch.from_numpy(qres), wq_b, None, dtype)
        if T:
            heads_float(y, T, H, HD, MODE_QNORM_ROPE, to_bf16, eps32, c, s, np.float32(1.0), q,
                        NO_Q, NO_S)
    return torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(qres)


# --------------------------------------------------------------------------- INT8 decode program
def _program_weights(x, wq_a, wkv, wq_b, H: int, HD: int):
    """``(pair pack, per-head wq_b pack)`` when the whole stage can run as
    :func:`_qkv_program`: float32 rows, ``wq_a`` | ``wkv`` prepared as one INT8 pair and
    ``wq_b`` per-row INT8, both in the register-tile layout; else None."""
    g = stage_group((wq_a, wkv), PairPack)
    if g is None or not isinstance(wq_b, QuantWeight) or not is_tiled(g.packed.layout) or x.dtype != torch.float32:
        return None
    check_quant_weight(wq_b, H * HD, g.n1, "wq_b")
    pw = heads_weight(wq_b, HD)
    return (g, pw) if is_tiled(pw.layout) else None


def _qkv_int8(x, prog, q_norm_w, kv_norm_w, cos, sin, H, HD, eps, to_bf16):
    g, pw = prog
    xr = f32_np(x.detach())
    T = xr.shape[0]
    c, s = f32_np(cos), f32_np(sin)
    if c.shape != (T, c.shape[1]) or s.shape != c.shape or 2 * c.shape[1] > HD:
        raise ValueError(f"cos/sin must be [T={T}, RD/2 <= HD/2], got {c.shape} / {s.shape}")
    QL, pp = g.n1, g.packed
    if xr.shape[1] != pp.k:
        raise ValueError(f"x has {xr.shape[1]} input features, wq_a has {pp.k}")
    qres = np.empty((T, QL), np.float32)
    kv = np.empty((T, HD), np.float32)
    q = np.empty((T, H, HD), np.float32)
    if T:
        TP1 = padded_tokens(T)
        TP = padded_rows(T)
        program = sized(_qkv_program, T * (pp.k * pp.n + QL * H * HD))  # the two GEMMs' multiply-adds
        program(xr, TP1, pp.kp // 4, pp.data, pp.np_, pp.n, pp.wsum128, pp.scale, DUMMY_I32, to_bf16,
                f32_np(q_norm_w), f32_np(kv_norm_w), c, s, np.float32(eps), TP, pw.kp // 4, pw.data,
                pw.wsum128, pw.scale, H, HD, MODE_QNORM_ROPE, NO_I8, NO_Q, NO_S, qres, kv, q)
    return torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(qres)


@njit_kernel
def _qkv_program(x, TP1, KG1, w1, NP1, N1, wsum1, sw1, dummy_i32, to_bf16, qnw, kvnw, c, s, eps, TP, KG, wp,
                 wsum, sw, H, HD, mode, no_i8, no_q, no_s, qres, kv, q):
    """The INT8 ``qkv_proj_rope`` in one dispatch, the kernels the stage calls one by one:
    the ``[wq_a; wkv]`` W8A8 GEMM (:func:`..common.gemm.w8a8_rows_f32`), the dtype rounding
    and split (:func:`.stage_shared.split_round`), the q-latent norm + INT8 pack and the kv
    norm + RoPE (:func:`_qkv_pre`), then the per-head ``wq_b`` GEMM with q norm + RoPE
    (:func:`.w8a8_heads.heads_vnni`)."""
    T = x.shape[0]
    y = np.empty((T, N1), np.float32)
    w8a8_rows_f32(x, np.empty(KG1 * 4 * TP1, np.uint8), np.empty(T, np.float32), TP1, KG1, w1, NP1, N1, wsum1, sw1,
                  dummy_i32, y)
    aq = np.empty((T, qres.shape[1]), np.float32)
    akv = np.empty((T, N1 - qres.shape[1]), np.float32)
    split_round(y, to_bf16, aq, akv)
    xp = np.empty(KG * 4 * TP, np.uint8)
    sx = np.empty(T, np.float32)
    _qkv_pre(aq, akv, qnw, kvnw, c, s, eps, to_bf16, 1, TP, KG, qres, kv, xp, no_i8, sx)
    heads_vnni(xp, TP, KG, wp, wsum, sx, sw, T, H, HD, mode, to_bf16, eps, c, s, np.float32(1.0), q, no_q, no_s)
