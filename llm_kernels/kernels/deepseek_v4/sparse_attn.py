"""Fused sparse attention with sinks, inverse RoPE and the grouped output projection.

Same signature, arguments and return type as
:func:`llm_kernels.reference.deepseek_v4.sparse_attn.sparse_attn` (spec §9.1-§9.3): float32
tensors holding ``dtype``-rounded values, the same rounding points.

Pipeline (per call; timings are Flash dims H=64, HD=512, 128 window + 512 compressed rows,
G=8, OL=1024, D=4096, bf16, measured on the 2-core Zen 4 dev VM):

1. **indices** (Numba, serial): each query's index list is validated (``>= N`` raises
   ``IndexError`` like the reference), padding ``-1`` dropped, duplicates removed and the
   rows sorted ascending (the reference's dense mask counts a repeated row once and sums
   in pool order) -> ``[T, Wmax]`` + a count per query. [T=8: 0.06 ms]
2. **gather** (Numba, ``prange`` over rows): the listed KV rows -> a zero-padded
   ``[T, Wmax, HD]`` block, converted to the compute dtype on the way. [T=8: 0.18 ms]
3. **scores** ``q·kvᵀ`` and **PV**: torch ``bmm`` on the gathered block (oneDNN; the bf16
   path uses AVX512_BF16 with fp32 accumulation and one rounding, the operation the
   reference runs). The lab notes (``cpu_kernel_lab.md`` §4) measured torch's bf16 matmul
   2.4x faster than Numba register tiles for this compute-bound part. [T=8: 0.46 + 0.83
   ms; T=1: 0.09 + 0.10 ms]
4. **softmax with sink** (Numba, one ``prange`` iteration per (token, head) row),
   bit-identical to the reference's ``torch.softmax`` over the dense masked row: SLEEF's
   ``expf`` reproduced with FMAs, torch's AVX-512 ``reduce_all`` summation order (lane =
   pool row % 16, then a fixed tree), ``p = rnd(e·(1/Σ))``. Replaces ~9 torch passes over
   ``[H, T, N+1]``. (A first version with a different ``exp``/sum order flipped 3.5e-5 of
   the bf16 probabilities, which after PV, bf16 rounding and the INT8 requantisation of
   wo_b became 0.47 % output outliers; bit-exact probabilities bring that to 0.05 %.)
   [T=8: 0.27 ms]
5. **inverse RoPE + rounding** of the attention output (Numba, strict fp32 order: products
   rounded before the add, no FMA contraction, like the reference). [T=8: 0.04 ms]
6. **wo_a** (grouped low-rank projection, 64 MiB bf16 at Flash) as a Numba GEMV, each
   work item a few rows of one group for all tokens:

   * bf16 mode with AVX512_BF16: ``vdpbf16ps`` register tiles (private llvmlite intrinsic
     :func:`_bf16_dot_tile`: 1x8, 2x4 or 4x4 tokens x rows, 16 fp32 lanes of exact bf16
     products per output, fixed lane-sum tree) on the natural ``[R, K]`` layout (no packed
     copy). [T=1 1.45 ms = 46 GB/s; T=8 2.0-2.2 ms; torch bmm 2.2 / 2.3-2.4 ms; the fp32
     FMA kernel below 1.65 / 2.6 ms]
   * otherwise (fp32 mode, odd K): 4 rows x 4 tokens fp32 FMA tiles, bf16 widened in
     registers.
   * ``T > WO_A_NUMBA_MAX_T``: torch's batched matmul (compute-bound; faster at T=12).

   Products of bf16 values are exact in fp32, so only the summation order differs from
   oneDNN; output rounded to ``dtype``.
7. **wo_b**: W8A8 (``QuantWeight``): per-(token, group) INT8 quantisation of the OL rows
   (bit-exact golden recipe, :func:`common.quant.quant_row_f32`), one exact INT32 VNNI
   GEMM per group through :func:`common.gemm.w8a8_gemm_i32` on the group's pre-packed
   weight slice (cached per ``wo_b`` object), and a Numba epilogue
   ``out = Σ_g fl(acc_g·s_g)`` (fp32, group order, like the golden) ``-> rnd(out·s_w)``.
   [32 MiB int8: T=1 0.5-0.65 ms, T=8 0.8-0.9 ms] Float ``wo_b``: torch GEMM exactly as
   the reference.

Whole stage (bf16, W8A8 wo_b, interleaved with the reference so caches are cold, DRAM
~80 GB/s): T=1 2.97 ms (reference 201 ms), T=8 6.0 ms (reference 180 ms); the projection
alone 2.3 / 4.1 ms for 100.7 MB of weights (44 / 25 GB/s).

Determinism: every Numba ``prange`` iteration owns its outputs and no parallel loop has a
floating-point reduction, so results are bitwise identical for any Numba thread count.
torch's bf16 bmm (oneDNN) was also bitwise stable between 1 and 2 torch threads; float32
mode's ``wo_b`` float GEMM is MKL sgemm, which is not for every row count (see the tests).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from numba import prange

from ..common.bf16 import f32_to_bf16_bits, load_f32, torch_bf16_as_u16, u16_as_torch_bf16
from ..common.gemm import pack_w8a8, w8a8_gemm_i32
from ..common import jit as _jit
from ..common.bf16 import round_f32 as _rnd
from ..common.jit import njit_kernel
from ..common.quant import quant_row_f32
from ..common.vecmath import sleef_expf as _sleef_expf
from ..common.vecmath import tree16 as _tree16
from ..common.x86 import bf16_dot_tile as _bf16_dot_tile
from ...numerics.quant import QuantWeight

__all__ = ["sparse_attn", "grouped_output_proj", "clear_cache", "WO_A_NUMBA_MAX_T"]

#: Largest token count for which wo_a runs as a Numba GEMV (above: torch's batched matmul,
#: which wins once the work is compute-bound: T=12 torch 2.6 ms vs 3.4-4.0 ms).
WO_A_NUMBA_MAX_T = 8
#: bf16 mode runs wo_a with ``vdpbf16ps`` register tiles (AVX512_BF16) when available.
USE_BF16_DOT = _jit.HAS_AVX512BF16 and not _jit.FORCE_FALLBACK

# fastmath for loops whose float reductions must vectorise (order then depends on the
# compiled code only, never on the thread count); no nnan/ninf so that -inf stays exact.
_FM = {"reassoc", "nsz", "contract", "arcp"}

_DUMMY_U16 = np.zeros(1, np.uint16)
_DUMMY_F32 = np.zeros(1, np.float32)


# --------------------------------------------------------------------------- 1. indices
@njit_kernel
def _prep_indices(indices, N, out, counts):
    """Valid rows of each query, deduplicated and sorted ascending, into ``out`` [T, W]
    (``-1`` after ``counts[t]``). Returns the largest index seen (for the range check)."""
    T, W = indices.shape
    mx = np.int64(-1)
    for t in range(T):
        row = indices[t]
        c = 0
        for j in range(W):
            v = np.int64(row[j])
            if v > mx:
                mx = v
            if v >= 0 and v < N:
                out[t, c] = v
                c += 1
        o = out[t, :c]
        o.sort()
        u = 0
        for j in range(c):
            if u == 0 or o[j] != o[u - 1]:
                o[u] = o[j]
                u += 1
        for j in range(u, W):
            out[t, j] = -1
        counts[t] = u
    return mx


# --------------------------------------------------------------------------- 2. gather
@njit_kernel(parallel=True)
def _gather(pool, idx, counts, Wm, to_bf16, out_u16, out_f32):
    """Rows ``pool[idx[t, j]]`` -> ``out[t, j]`` (``[T, Wm, HD]``), zeros for ``j >=
    counts[t]``; bf16 bits (RNE from float32, exact for bf16-valued input) or float32."""
    T = idx.shape[0]
    HD = pool.shape[1]
    for i in prange(T * Wm):
        t = i // Wm
        j = i - t * Wm
        if to_bf16:
            o16 = out_u16[t, j]
            if j < counts[t]:
                src = pool[idx[t, j]]
                for d in range(HD):
                    o16[d] = f32_to_bf16_bits(load_f32(src[d]))
            else:
                for d in range(HD):
                    o16[d] = np.uint16(0)
        else:
            o32 = out_f32[t, j]
            if j < counts[t]:
                src = pool[idx[t, j]]
                for d in range(HD):
                    o32[d] = load_f32(src[d])
            else:
                for d in range(HD):
                    o32[d] = np.float32(0.0)


# --------------------------------------------------------------------------- 4. softmax
@njit_kernel(parallel=True)
def _softmax_sink(s, idx, counts, N, sink, scale, to_bf16, p_u16, p_f32):
    """Softmax over each query's valid entries plus the head's sink, bit-identical to the
    reference's dense form ``torch.softmax(cat([masked scores [N], sink]))`` on AVX-512
    torch: ``v_j = rnd(rnd(s)·scale)``, ``m = max(v, sink)``, ``e = exp(v - m)`` (SLEEF
    ``xexpf``), ``Σ`` in torch's ``reduce_all`` order (entry at pool row ``r`` goes to lane
    ``r % 16``, lanes summed in ascending row order, the sink — dense position N — last,
    then :func:`_tree16`; a dense row shorter than 16 is summed sequentially), ``p_j =
    rnd(e_j·(1/Σ))``; padding entries get ``p = 0``. One (t, h) row per iteration, no
    fastmath (the summation order is the point)."""
    T, H, Wm = s.shape
    for i in prange(T * H):
        t = i // H
        h = i - t * H
        c = counts[t]
        srow = s[t, h]
        irow = idx[t]
        buf = np.empty(max(c, 1), np.float32)
        sk = np.float32(sink[h])
        m = sk
        for j in range(c):
            buf[j] = _rnd(np.float32(load_f32(srow[j]) * scale), to_bf16)
        for j in range(c):
            m = max(m, buf[j])
        for j in range(c):
            buf[j] = _sleef_expf(np.float32(buf[j] - m))
        esk = _sleef_expf(np.float32(sk - m))
        if N + 1 < 16:
            tot = np.float32(0.0)
            for j in range(c):
                tot = np.float32(tot + buf[j])
            tot = np.float32(tot + esk)
        else:
            lanes = np.zeros(16, np.float32)
            for j in range(c):
                ln = irow[j] & 15
                lanes[ln] = np.float32(lanes[ln] + buf[j])
            lanes[N & 15] = np.float32(lanes[N & 15] + esk)
            tot = _tree16(lanes)
        inv = np.float32(np.float32(1.0) / tot)
        if to_bf16:
            prow = p_u16[t, h]
            for j in range(c):
                prow[j] = f32_to_bf16_bits(np.float32(buf[j] * inv))
            for j in range(c, Wm):
                prow[j] = np.uint16(0)
        else:
            prow32 = p_f32[t, h]
            for j in range(c):
                prow32[j] = np.float32(buf[j] * inv)
            for j in range(c, Wm):
                prow32[j] = np.float32(0.0)


# --------------------------------------------------------------------------- 5. inverse RoPE
@njit_kernel(parallel=True)
def _rope_inv_round(o, cos, sin, to_bf16, out):
    """``out[t, h*HD + d]`` = rnd(o[t, h, d]) with the trailing ``2·len(cos)`` lanes rotated
    by ``-θ`` (interleaved pairs): ``e' = e·c + o·s``, ``o' = o·c − e·s`` (each product
    rounded, no FMA, as the reference)."""
    T, H, HD = o.shape
    half = cos.shape[1]
    nope = HD - 2 * half
    for i in prange(T * H):
        t = i // H
        h = i - t * H
        src = o[t, h]
        dst = out[t, h * HD:(h + 1) * HD]
        for d in range(nope):
            dst[d] = _rnd(load_f32(src[d]), to_bf16)
        cr = cos[t]
        sr = sin[t]
        for k in range(half):
            c = cr[k]
            sn = -sr[k]
            e = load_f32(src[nope + 2 * k])
            od = load_f32(src[nope + 2 * k + 1])
            dst[nope + 2 * k] = _rnd(np.float32(np.float32(e * c) - np.float32(od * sn)), to_bf16)
            dst[nope + 2 * k + 1] = _rnd(np.float32(np.float32(od * c) + np.float32(e * sn)), to_bf16)


# --------------------------------------------------------------------------- 6. wo_a GEMV
@njit_kernel(fastmath=_FM)
def _dot4x4(w, r0, x, t0, g, K, out, to_bf16):
    """4 weight rows x 4 tokens: ``out[t0+a, r0+b] = rnd(Σ_k w[r0+b, k]·x[t0+a, g, k])``."""
    w0 = w[r0]
    w1 = w[r0 + 1]
    w2 = w[r0 + 2]
    w3 = w[r0 + 3]
    xa = x[t0, g]
    xb = x[t0 + 1, g]
    xc = x[t0 + 2, g]
    xd = x[t0 + 3, g]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)  # noqa: E702
    b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)  # noqa: E702
    c0 = np.float32(0.0); c1 = np.float32(0.0); c2 = np.float32(0.0); c3 = np.float32(0.0)  # noqa: E702
    d0 = np.float32(0.0); d1 = np.float32(0.0); d2 = np.float32(0.0); d3 = np.float32(0.0)  # noqa: E702
    for k in range(K):
        f0 = load_f32(w0[k])
        f1 = load_f32(w1[k])
        f2 = load_f32(w2[k])
        f3 = load_f32(w3[k])
        u = xa[k]
        a0 += f0 * u; a1 += f1 * u; a2 += f2 * u; a3 += f3 * u  # noqa: E702
        u = xb[k]
        b0 += f0 * u; b1 += f1 * u; b2 += f2 * u; b3 += f3 * u  # noqa: E702
        u = xc[k]
        c0 += f0 * u; c1 += f1 * u; c2 += f2 * u; c3 += f3 * u  # noqa: E702
        u = xd[k]
        d0 += f0 * u; d1 += f1 * u; d2 += f2 * u; d3 += f3 * u  # noqa: E702
    out[t0, r0] = _rnd(a0, to_bf16); out[t0, r0 + 1] = _rnd(a1, to_bf16)  # noqa: E702
    out[t0, r0 + 2] = _rnd(a2, to_bf16); out[t0, r0 + 3] = _rnd(a3, to_bf16)  # noqa: E702
    out[t0 + 1, r0] = _rnd(b0, to_bf16); out[t0 + 1, r0 + 1] = _rnd(b1, to_bf16)  # noqa: E702
    out[t0 + 1, r0 + 2] = _rnd(b2, to_bf16); out[t0 + 1, r0 + 3] = _rnd(b3, to_bf16)  # noqa: E702
    out[t0 + 2, r0] = _rnd(c0, to_bf16); out[t0 + 2, r0 + 1] = _rnd(c1, to_bf16)  # noqa: E702
    out[t0 + 2, r0 + 2] = _rnd(c2, to_bf16); out[t0 + 2, r0 + 3] = _rnd(c3, to_bf16)  # noqa: E702
    out[t0 + 3, r0] = _rnd(d0, to_bf16); out[t0 + 3, r0 + 1] = _rnd(d1, to_bf16)  # noqa: E702
    out[t0 + 3, r0 + 2] = _rnd(d2, to_bf16); out[t0 + 3, r0 + 3] = _rnd(d3, to_bf16)  # noqa: E702


@njit_kernel(fastmath=_FM)
def _dot4x1(w, r0, x, t, g, K, out, to_bf16):
    """4 weight rows x 1 token."""
    w0 = w[r0]
    w1 = w[r0 + 1]
    w2 = w[r0 + 2]
    w3 = w[r0 + 3]
    xa = x[t, g]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)  # noqa: E702
    for k in range(K):
        u = xa[k]
        a0 += load_f32(w0[k]) * u
        a1 += load_f32(w1[k]) * u
        a2 += load_f32(w2[k]) * u
        a3 += load_f32(w3[k]) * u
    out[t, r0] = _rnd(a0, to_bf16); out[t, r0 + 1] = _rnd(a1, to_bf16)  # noqa: E702
    out[t, r0 + 2] = _rnd(a2, to_bf16); out[t, r0 + 3] = _rnd(a3, to_bf16)  # noqa: E702


@njit_kernel(fastmath=_FM)
def _dot1x1(w, r, x, t, g, K, out, to_bf16):
    wr = w[r]
    xa = x[t, g]
    a = np.float32(0.0)
    for k in range(K):
        a += load_f32(wr[k]) * xa[k]
    out[t, r] = _rnd(a, to_bf16)


@njit_kernel(parallel=True)
def _grouped_gemv(w, x, OL, to_bf16, out):
    """``out[t, g·OL + o] = rnd(Σ_k w[g·OL + o, k]·x[t, g, k])`` for w ``[G·OL, K]`` (bf16 bits
    or float32) and x ``[T, G, K]`` float32. Work items: blocks of 4 rows inside one group
    (a group's tail rows singly); each item owns its output columns for all tokens."""
    R, K = w.shape
    T, G, _ = x.shape
    nq = (OL + 3) // 4
    for b in prange(G * nq):
        g = b // nq
        r0 = g * OL + (b - g * nq) * 4
        nr = min(4, (g + 1) * OL - r0)
        if nr == 4:
            t = 0
            while t + 4 <= T:
                _dot4x4(w, r0, x, t, g, K, out, to_bf16)
                t += 4
            while t < T:
                _dot4x1(w, r0, x, t, g, K, out, to_bf16)
                t += 1
        else:
            for r in range(r0, r0 + nr):
                for t in range(T):
                    _dot1x1(w, r, x, t, g, K, out, to_bf16)


# --------------------------------------------------------------------------- 6b. wo_a with vdpbf16ps
#: token-tile heights of the vdpbf16ps wo_a kernel and the weight rows per tile (measured
#: at Flash dims, 64 MiB bf16 wo_a: 1x8 1.45 ms at T=1; for T=8 two 4x4 passes 2.0 ms vs
#: one 8x2 pass 2.1-2.7 ms, torch bf16 bmm 2.3 ms; T=12: torch 2.6 ms beats every tiling)
_BF_TILES = {1: 8, 2: 4, 4: 4}
_BT1, _BT2, _BT4 = (_bf16_dot_tile(t, r) for t, r in _BF_TILES.items())


@njit_kernel
def _bf_tile(tp, nr, x, x_off, x_ts, w, w_off, K, nk, out):
    if tp == 1:
        _BT1(x, x_off, x_ts, w, w_off, K, nk, out, 0)
    elif tp == 2:
        _BT2(x, x_off, x_ts, w, w_off, K, nk, out, 0)
    else:
        _BT4(x, x_off, x_ts, w, w_off, K, nk, out, 0)


@njit_kernel(parallel=True)
def _grouped_gemv_bf16(w, xb, T, tp, nr, OL, to_bf16, out):
    """``out[t, g·OL + o] = rnd(Σ_k w[g·OL + o, k]·x[t, g, k])`` with the vdpbf16ps tiles:
    w ``[R, K]`` bf16 bits, xb ``[TP, G, K]`` bf16 bits (rows >= T zero), token tiles of
    ``tp`` rows, ``nr`` weight rows per work item (``OL % nr == 0``, ``K % 32 == 0``). Each
    item owns its rows' outputs for every token."""
    R, K = w.shape
    TP, G, _ = xb.shape
    wf = w.reshape(-1)
    xf = xb.reshape(-1)
    nk = K // 32
    for b in prange(R // nr):
        r0 = b * nr
        g = r0 // OL
        scratch = np.empty(tp * nr, np.float32)
        for t0 in range(0, TP, tp):
            _bf_tile(tp, nr, xf, (t0 * G + g) * K, G * K, wf, r0 * K, K, nk, scratch)
            for t in range(t0, min(t0 + tp, T)):
                for r in range(nr):
                    out[t, r0 + r] = _rnd(scratch[(t - t0) * nr + r], to_bf16)


def _bf16_tile_shape(T: int) -> tuple[int, int, int]:
    """(token tile height, weight rows per item, padded token count) for ``T`` tokens."""
    tp = 1 if T <= 1 else 2 if T <= 2 else 4
    return tp, _BF_TILES[tp], -(-T // tp) * tp


# --------------------------------------------------------------------------- 7. wo_b (W8A8)
@njit_kernel(parallel=True)
def _quant_groups(r, G, q, s):
    """Per-(token, group) INT8 quantisation of ``r`` [T, G·OL] into ``q`` [G, T, OL] and
    ``s`` [T, G] (bit-exact golden ``quant_per_row``)."""
    T = r.shape[0]
    OL = q.shape[2]
    for i in prange(T * G):
        t = i // G
        g = i - t * G
        s[t, g] = quant_row_f32(r[t, g * OL:(g + 1) * OL], q[g, t])


@njit_kernel(parallel=True)
def _combine_groups(acc, s, sw, to_bf16, out):
    """``out[t, n] = rnd(fl(Σ_g fl(acc[g, t, n]·s[t, g]))·sw[n])``, groups summed in order
    from 0.0 exactly like the golden's ``out += acc.float() * s[:, g]``."""
    G, T, N = acc.shape
    NB = 256
    nb = (N + NB - 1) // NB
    for i in prange(T * nb):
        t = i // nb
        n0 = (i - t * nb) * NB
        n1 = min(N, n0 + NB)
        orow = out[t]
        for n in range(n0, n1):
            v = np.float32(0.0)
            for g in range(G):
                v = np.float32(v + np.float32(np.float32(acc[g, t, n]) * s[t, g]))
            orow[n] = _rnd(np.float32(v * sw[n]), to_bf16)


# --------------------------------------------------------------------------- weight caches
_LOCK = threading.Lock()
_WO_B: dict[int, tuple[Any, int, list]] = {}
_WO_A: dict[int, tuple[Any, np.ndarray]] = {}


def clear_cache() -> None:
    """Drop the packed ``wo_b`` slices and converted ``wo_a`` copies (and the references
    that keep their source weights alive)."""
    with _LOCK:
        _WO_B.clear()
        _WO_A.clear()


def _packed_wo_b(wo_b: QuantWeight, o_groups: int) -> list:
    ent = _WO_B.get(id(wo_b))
    if ent is not None and ent[0] is wo_b and ent[1] == o_groups:
        return ent[2]
    with _LOCK:
        D, GOL = wo_b.shape
        if GOL % o_groups:
            raise ValueError(f"wo_b in-dim {GOL} is not divisible by o_groups={o_groups}")
        ol = GOL // o_groups
        qw = wo_b.qweight
        sc = wo_b.scale.float().contiguous()
        packs = [pack_w8a8(qw[:, g * ol:(g + 1) * ol].contiguous(), sc) for g in range(o_groups)]
        _WO_B[id(wo_b)] = (wo_b, o_groups, packs)
    return packs


def _wo_a_array(wo_a: torch.Tensor, to_bf16: bool) -> np.ndarray:
    """wo_a as a C-contiguous numpy array the GEMV reads: bf16 bits (uint16) for a bf16
    tensor, float32 for a float32 one in float32 mode; a float32 weight in bf16 mode is
    rounded to bf16 once (the reference casts it on every call) and cached."""
    w = wo_a.detach()
    if w.dtype == torch.bfloat16:
        return torch_bf16_as_u16(w.contiguous())
    if not to_bf16:
        return w.float().contiguous().numpy()
    ent = _WO_A.get(id(wo_a))
    if ent is not None and ent[0] is wo_a:
        return ent[1]
    arr = torch_bf16_as_u16(w.to(torch.bfloat16).contiguous())
    with _LOCK:
        _WO_A[id(wo_a)] = (wo_a, arr)
    return arr


def _np_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _kernel_view(t: torch.Tensor) -> np.ndarray:
    """float32 or bf16-bits numpy view of a tensor (other dtypes -> float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return torch_bf16_as_u16(t.contiguous())
    return t.float().contiguous().numpy()


# --------------------------------------------------------------------------- output projection
def _wo_b_project(r: np.ndarray, wo_b, o_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, G·OL] float32 (dtype-rounded) -> [T, D] through wo_b (W8A8 or float)."""
    to_bf16 = dtype == torch.bfloat16
    T = r.shape[0]
    if isinstance(wo_b, QuantWeight):
        packs = _packed_wo_b(wo_b, o_groups)
        D = wo_b.shape[0]
        ol = r.shape[1] // o_groups
        q = np.empty((o_groups, T, ol), np.int8)
        s = np.empty((T, o_groups), np.float32)
        out = np.empty((T, D), np.float32)
        if T == 0:
            return torch.from_numpy(out)
        _quant_groups(r, o_groups, q, s)
        acc = np.empty((o_groups, T, D), np.int32)
        for g in range(o_groups):
            acc[g] = w8a8_gemm_i32(q[g], packs[g])
        _combine_groups(acc, s, wo_b.scale.float().contiguous().numpy(), to_bf16, out)
        return torch.from_numpy(out)
    rt = torch.from_numpy(r)
    if dtype == torch.float32:
        return torch.matmul(rt, wo_b.float().T)
    return torch.matmul(rt.to(dtype), wo_b.to(dtype).T).float()


def _wo_a_project(x: np.ndarray, wo_a: torch.Tensor, o_groups: int, dtype: torch.dtype) -> np.ndarray:
    """x [T, G, K] float32 (dtype-rounded) -> r [T, G·OL] float32 rounded to dtype."""
    to_bf16 = dtype == torch.bfloat16
    T, G, K = x.shape
    R = wo_a.shape[0]
    if wo_a.shape[1] != K or R % G:
        raise ValueError(f"wo_a {tuple(wo_a.shape)} does not match {G} groups of {K} inputs")
    ol = R // G
    if T > WO_A_NUMBA_MAX_T:  # compute-bound: torch's bf16/fp32 batched matmul is faster
        wa = wo_a.detach().view(G, ol, K)
        xt = torch.from_numpy(x).transpose(0, 1)
        if to_bf16:
            r = torch.matmul(xt.to(torch.bfloat16), wa.to(torch.bfloat16).transpose(1, 2)).float()
        else:
            r = torch.matmul(xt, wa.float().transpose(1, 2))
        return r.transpose(0, 1).reshape(T, R).contiguous().numpy()
    out = np.empty((T, R), np.float32)
    if not (T and R):
        return out
    w = _wo_a_array(wo_a, to_bf16)
    if USE_BF16_DOT and to_bf16 and w.dtype == np.uint16 and K % 32 == 0 and K:
        tp, nr, TP = _bf16_tile_shape(T)
        if ol % nr == 0:
            xb = torch.zeros(TP, G, K, dtype=torch.bfloat16)
            xb[:T] = torch.from_numpy(x)            # exact: x holds bf16 values
            _grouped_gemv_bf16(w, torch_bf16_as_u16(xb), T, tp, nr, ol, True, out)
            return out
    _grouped_gemv(w, x, ol, to_bf16, out)
    return out


def grouped_output_proj(o: torch.Tensor, wo_a: torch.Tensor, wo_b, *, o_groups: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Grouped low-rank output projection (same contract as the reference function):
    o [T, H, HD] (dtype-rounded) -> [T, D] float32 holding dtype values."""
    T = o.shape[0]
    x = _np_f32(o).reshape(T, o_groups, o.shape[1] * o.shape[2] // o_groups)
    r = _wo_a_project(x, wo_a, o_groups, dtype)
    return _wo_b_project(r, wo_b, o_groups, dtype)


# --------------------------------------------------------------------------- sparse_attn
def sparse_attn(q: torch.Tensor, kv_pool: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, wo_a: torch.Tensor, wo_b, *,
                o_groups: int, softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Attention of each query over its own rows of a KV pool, then the output projection.
    Same signature, semantics and return type as the reference ``sparse_attn``:

    q [T, H, HD] roped queries; kv_pool [N, HD]; indices [T, W] (-1 = padding);
    attn_sink [H]; cos, sin [T, RD/2]; wo_a [G·OL, (H/G)·HD]; wo_b [D, G·OL] or QuantWeight.
    Returns [T, D] float32 holding ``dtype``-rounded values."""
    o = sparse_attn_core(q, kv_pool, indices, attn_sink, cos, sin, softmax_scale=softmax_scale, dtype=dtype)
    return grouped_output_proj(o, wo_a, wo_b, o_groups=o_groups, dtype=dtype)


def sparse_attn_core(q: torch.Tensor, kv_pool: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, *, softmax_scale: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """The attention part of :func:`sparse_attn` (gather, scores, softmax with sink, PV,
    inverse RoPE): returns o [T, H, HD] float32 holding ``dtype``-rounded values, the input
    of :func:`grouped_output_proj`. Same contract as the reference ``sparse_attn_core``."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    to_bf16 = dtype == torch.bfloat16
    T, H, HD = q.shape
    N = kv_pool.shape[0]
    idx_in = indices.detach().to(torch.int64).contiguous().numpy()
    if idx_in.ndim != 2 or idx_in.shape[0] != T:
        raise ValueError(f"indices must be [T={T}, W], got {tuple(indices.shape)}")
    W = idx_in.shape[1]
    idx = np.empty((T, max(W, 1)), np.int64)
    counts = np.zeros(T, np.int64)
    mx = _prep_indices(idx_in, N, idx, counts) if T and W else -1
    if mx >= N:
        raise IndexError(f"indices reference row {mx} but kv_pool has {N} rows")
    Wm = max(int(counts.max()) if T else 0, 1)
    pool = _kernel_view(kv_pool)
    cdt = torch.bfloat16 if to_bf16 else torch.float32
    # 2. gather
    if to_bf16:
        kvg_np = np.empty((T, Wm, HD), np.uint16)
        _gather(pool, idx, counts, Wm, True, kvg_np, _DUMMY_F32.reshape(1, 1, 1))
        kvg = u16_as_torch_bf16(kvg_np)
    else:
        kvg_np = np.empty((T, Wm, HD), np.float32)
        _gather(pool, idx, counts, Wm, False, _DUMMY_U16.reshape(1, 1, 1), kvg_np)
        kvg = torch.from_numpy(kvg_np)
    # 3. scores
    s = torch.bmm(q.detach().to(cdt), kvg.transpose(1, 2))                     # [T, H, Wm]
    sink = attn_sink.detach().float().contiguous().numpy()
    # 4. softmax with sink
    if to_bf16:
        p_np = np.empty((T, H, Wm), np.uint16)
        _softmax_sink(torch_bf16_as_u16(s), idx, counts, N, sink, np.float32(softmax_scale), True, p_np,
                      _DUMMY_F32.reshape(1, 1, 1))
        p = u16_as_torch_bf16(p_np)
    else:
        p_np = np.empty((T, H, Wm), np.float32)
        _softmax_sink(s.numpy(), idx, counts, N, sink, np.float32(softmax_scale), False,
                      _DUMMY_U16.reshape(1, 1, 1), p_np)
        p = torch.from_numpy(p_np)
    # PV
    o = torch.bmm(p, kvg)                                                      # [T, H, HD]
    # 5. inverse RoPE + rounding
    x = np.empty((T, H * HD), np.float32)
    if T:
        _rope_inv_round(_kernel_view(o), _np_f32(cos).reshape(T, -1), _np_f32(sin).reshape(T, -1),
                        to_bf16, x)
    return torch.from_numpy(x).view(T, H, HD)
