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

The helpers below the ``shared`` marker (weight cache, tile dispatch, epilogues, FWHT)
are also used by :mod:`.indexer`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from ...reference.deepseek_v4.quant import QuantWeight
from ..common import jit
from ..common.bf16 import bf16_bits_to_f32, f32_to_bf16_bits, load_f32
from ..common.gemm import PackedW8A8, pack_w8a8
from ..common.jit import njit_kernel
from ..common.quant import quant_row_f32
from ..common.x86 import vnni_bcast_tile

__all__ = ["qkv_proj_rope"]

# =========================================================================== shared
# --------------------------------------------------------------------------- host helpers


def f32_np(t: Any) -> np.ndarray:
    """C-contiguous float32 numpy view (copy only when needed) of a CPU tensor."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    return t.detach().float().contiguous().numpy()


class _StrongRef:
    """Callable like a weak reference, but holding the object."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


class WeightCache:
    """Per-weight-object cache of derived data (packed layouts, converted copies).

    Keyed by ``id(weight)`` and validated through a weak reference, so an id reused by a
    new object after the old one died never returns stale data; the entry is dropped when
    the weight is garbage collected (no leak, no strong reference held)."""

    def __init__(self) -> None:
        self._d: dict[tuple[int, Any], tuple[Any, Any]] = {}

    def get(self, w: Any, tag: Any, build: Callable[[Any], Any]) -> Any:
        key = (id(w), tag)
        ent = self._d.get(key)
        if ent is not None and ent[0]() is w:
            return ent[1]
        val = build(w)
        try:
            ref = weakref.ref(w)
            weakref.finalize(w, self._d.pop, key, None)
        except TypeError:  # not weak-referenceable: keep it alive with the entry
            ref = _StrongRef(w)
        self._d[key] = (ref, val)
        return val

    def clear(self) -> None:
        self._d.clear()


WEIGHTS = WeightCache()


def packed_w8a8(qw: QuantWeight, plain: bool = False) -> PackedW8A8:
    """The packed form of a :class:`QuantWeight` for the active kernel family (``vnni``
    broadcast layout when :data:`jit.USE_VNNI`, else the plain ``[N, K]`` layout; ``plain``
    forces the latter), cached per weight object."""
    layout = "nk" if (plain or not jit.USE_VNNI) else "vnni"
    return WEIGHTS.get(qw, layout, lambda w: pack_w8a8(w.qweight, w.scale.float(), layout))


def float_linear(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference ``linear`` for a float weight (torch GEMM, one rounding to ``dtype``)."""
    if dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x.to(dtype), w.to(dtype)).float()


#: Token counts up to which the Numba GEMV replaces torch for float weights. Measured on
#: the 2-core Zen 4 box (bf16 weights streamed from DRAM): one token, Flash wq_a + wkv
#: (12 MiB) 0.19-0.29 ms vs torch 0.51-0.67 ms, wq_b (64 MiB) 1.8 vs 2.6 ms (37 vs 26 GB/s);
#: a 2-4-token variant sharing each weight load lost to torch at T=2 (0.77 vs 0.68 ms)
#: and T=8 (1.05 vs 0.62): oneDNN's AVX512_BF16 kernel wins once the GEMM is not purely
#: bandwidth bound.
GEMV_MAX_T = 1


def _gemv_weight(w: Any, dtype: torch.dtype) -> np.ndarray | None:
    """Zero-copy numpy view of a float weight for :func:`_gemv_pair` (bf16 as uint16 bits),
    or None when the reference would convert it (a float32 weight in a bf16 run is rounded
    to bf16 by the reference's ``w.to(dtype)``) or it is not a plain CPU tensor."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type != "cpu" or w.requires_grad:
        return None
    if w.dtype == torch.bfloat16:
        return w.contiguous().view(torch.int16).numpy().view(np.uint16)
    if w.dtype == torch.float32 and dtype == torch.float32:
        return w.contiguous().numpy()
    return None


_NO_APE = np.zeros((1, 1), np.float32)
_NO_SLOTS = np.zeros(1, np.int64)


def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, dtype: torch.dtype,
                ape: np.ndarray | None = None, slots: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``rnd(x @ w1ᵀ)`` and ``rnd(x @ w2ᵀ) (+ ape[slots])`` (float weights, same K) as
    float32 numpy arrays: one Numba GEMV call for ``T <= GEMV_MAX_T`` (both weights in
    one parallel loop, bf16 widened in registers), else torch (the reference's GEMM)."""
    T = x.shape[0]
    a1 = _gemv_weight(w1, dtype) if T <= GEMV_MAX_T else None
    a2 = None
    if a1 is not None and w2 is not None:
        a2 = _gemv_weight(w2, dtype)
        if a2 is None or a2.dtype != a1.dtype or a2.shape[1] != a1.shape[1]:
            a1 = None
    if a1 is not None and T > 0:
        xr = x.to(dtype).float() if dtype == torch.bfloat16 else x.float()
        xn = xr.contiguous().numpy()
        if a2 is None:
            a2 = a1[:0]
        o1 = np.empty((T, a1.shape[0]), np.float32)
        o2 = np.empty((T, a2.shape[0]), np.float32)
        add = ape is not None
        _gemv_pair(xn, a1, a2, dtype == torch.bfloat16, o1, o2, ape if add else _NO_APE,
                   slots if add else _NO_SLOTS, add)
        return o1, (o2 if w2 is not None else None)
    y1 = f32_np(float_linear(x, w1, dtype))
    if w2 is None:
        return y1, None
    y2 = f32_np(float_linear(x, w2, dtype))  # a fresh tensor's buffer: ape added in place
    if ape is not None and T:
        add_ape(y2, ape, slots)
    return y1, y2


@njit_kernel
def add_ape(score, ape, slots):
    """``score[t, :] += ape[slots[t], :]`` in place (one token row per iteration)."""
    T, C = score.shape
    for t in range(T):
        a = ape[slots[t]]
        for i in range(C):
            score[t, i] = np.float32(score[t, i] + a[i])


@njit_kernel(fastmath={"reassoc", "nsz", "contract"})
def _dot_w(xr, wr):
    """fp32 dot product of an activation row with a float32 / bf16-bits weight row
    (``reassoc``/``contract``: the compiler vectorises the reduction with FMAs, in an
    order fixed at compile time)."""
    acc = np.float32(0.0)
    for k in range(wr.size):
        acc += xr[k] * load_f32(wr[k])
    return acc


@njit_kernel(parallel=True)
def _gemv_pair(x, w1, w2, to_bf16, out1, out2, ape, slots, with_ape):
    """``out1 = rnd(x @ w1ᵀ)``, ``out2 = rnd(x @ w2ᵀ) (+ ape[slots[t]])`` for a single (or
    a few) tokens: one output channel per ``prange`` iteration over both weights (one
    launch, one pass over each weight row); fp32 accumulation in a fixed order,
    identical for every thread count. Weights: float32 or bf16 bits (uint16)."""
    T = x.shape[0]
    N1 = w1.shape[0]
    N = N1 + w2.shape[0]
    for n in prange(N):
        if n < N1:
            wr = w1[n]
            for t in range(T):
                out1[t, n] = rnd(_dot_w(x[t], wr), to_bf16)
        else:
            m = n - N1
            wr = w2[m]
            for t in range(T):
                v = rnd(_dot_w(x[t], wr), to_bf16)
                if with_ape:
                    v = np.float32(v + ape[slots[t], m])
                out2[t, m] = v


def padded_rows(T: int) -> int:
    """Rows of the packed activation buffer: tiles of 16 tokens plus one remainder tile
    padded to the next entry of :data:`TILE_HEIGHTS`."""
    n16, r = divmod(int(T), 16)
    if r == 0:
        return int(T)
    return n16 * 16 + next(h for h in TILE_HEIGHTS if h >= r)


# --------------------------------------------------------------------------- scalar helpers
_ONE = np.float32(1.0)
_LANES = 8   # torch's AVX-512 float sum kernel: 8-lane vectors ...
_ILP = 4     # ... 4-way ILP ...
_LEVELS = 4  # ... 4-level cascade


@njit_kernel
def rnd(v, to_bf16):
    """float32 ``v`` rounded to bf16 (RNE) when ``to_bf16``, as float32."""
    if to_bf16:
        return bf16_bits_to_f32(f32_to_bf16_bits(np.float32(v)))
    return np.float32(v)


@njit_kernel
def _ceil_log2(x):
    if x <= 2:
        return 1
    n = 0
    v = x - 1
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit_kernel
def sumsq(buf):
    """``Σ buf[i]²`` (squares rounded first) in the order of torch's CPU ``sum`` over a
    contiguous row (ATen ``SumKernel.cpp``: ``vectorized_inner_sum`` -> 4-way ILP ``row_sum``
    -> 4-level ``multi_row_sum`` cascade over 8-lane vectors, scalar tail, lanes left to
    right), so ``x.pow(2).mean(-1)`` is bitwise reproduced. Private copy of the algorithm
    in ``kernels/common/norm_rope.py`` (only exposed there as a private helper)."""
    D = buf.size
    L = _LANES
    if D < L:
        p = np.zeros(_ILP, np.float32)
        n4 = D // _ILP
        for i in range(n4):
            for k in range(_ILP):
                v = buf[i * _ILP + k]
                p[k] += np.float32(v * v)
        for i in range(n4 * _ILP, D):
            v = buf[i]
            p[0] += np.float32(v * v)
        s = p[0]
        for k in range(1, _ILP):
            s += p[k]
        return np.float32(np.float32(0.0) + s)
    vec_num = D // L
    size_ilp = vec_num // _ILP
    lp = max(4, _ceil_log2(size_ilp) // _LEVELS)
    step = 1 << lp
    lmask = step - 1
    acc = np.zeros((_LEVELS, _ILP, L), np.float32)
    i = 0
    while i + step <= size_ilp:
        for _ in range(step):
            for k in range(_ILP):
                b = (i * _ILP + k) * L
                for l in range(L):
                    v = buf[b + l]
                    acc[0, k, l] += np.float32(v * v)
            i += 1
        for j in range(1, _LEVELS):
            for k in range(_ILP):
                for l in range(L):
                    acc[j, k, l] += acc[j - 1, k, l]
                    acc[j - 1, k, l] = np.float32(0.0)
            if (i & (lmask << (j * lp))) != 0:
                break
    while i < size_ilp:
        for k in range(_ILP):
            b = (i * _ILP + k) * L
            for l in range(L):
                v = buf[b + l]
                acc[0, k, l] += np.float32(v * v)
        i += 1
    for j in range(1, _LEVELS):
        for k in range(_ILP):
            for l in range(L):
                acc[0, k, l] += acc[j, k, l]
    for r in range(size_ilp * _ILP, vec_num):
        for l in range(L):
            v = buf[r * L + l]
            acc[0, 0, l] += np.float32(v * v)
    for k in range(1, _ILP):
        for l in range(L):
            acc[0, 0, l] += acc[0, k, l]
    s = np.float32(0.0)
    for i2 in range(vec_num * L, D):
        v = buf[i2]
        s += np.float32(v * v)
    for l in range(L):
        s += acc[0, 0, l]
    return s


@njit_kernel
def rms_factor(buf, eps):
    """``rsqrt(mean(buf²) + eps)`` as torch computes it (sum / D, then 1/sqrt)."""
    ms = np.float32(sumsq(buf) / np.float32(buf.size))
    return np.float32(_ONE / np.float32(np.sqrt(np.float32(ms + eps))))


@njit_kernel
def norm_weighted(buf, w, eps, to_bf16):
    """In place: ``rnd(w · (x · r))`` (reference ``rms_norm`` with a weight)."""
    r = rms_factor(buf, eps)
    for i in range(buf.size):
        buf[i] = rnd(np.float32(w[i] * np.float32(buf[i] * r)), to_bf16)


@njit_kernel
def norm_unweighted(buf, eps, to_bf16):
    """In place: ``rnd(x · rnd(r))`` (reference ``rms_norm`` with ``weight=None``)."""
    rr = rnd(rms_factor(buf, eps), to_bf16)
    for i in range(buf.size):
        buf[i] = rnd(np.float32(buf[i] * rr), to_bf16)


@njit_kernel
def rope(buf, c, s, to_bf16):
    """In place: interleaved RoPE on the trailing ``2·len(c)`` lanes, rounded (the
    reference ``apply_rope``: ``fl(fl(e·c) − fl(o·s))``, ``fl(fl(o·c) + fl(e·s))``). The
    leading "nope" lanes are left alone: callers pass rows already rounded to the output
    dtype (the reference's re-rounding of them is then a no-op)."""
    half = c.size
    nope = buf.size - 2 * half
    for i in range(half):
        e = buf[nope + 2 * i]
        o = buf[nope + 2 * i + 1]
        ci = c[i]
        si = s[i]
        buf[nope + 2 * i] = rnd(np.float32(np.float32(e * ci) - np.float32(o * si)), to_bf16)
        buf[nope + 2 * i + 1] = rnd(np.float32(np.float32(o * ci) + np.float32(e * si)), to_bf16)


@njit_kernel
def fwht(buf, scale):
    """In place: ``buf @ H_n`` · ``scale`` for the Sylvester Hadamard ``H_n`` (natural
    order butterflies, n = buf.size a power of two), O(n log n). With
    ``scale = fl(1/fl(sqrt n))`` this is the reference ``x @ hadamard(n)`` up to the
    summation order (a few fp32 ulps)."""
    n = buf.size
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a = buf[j]
                b = buf[j + h]
                buf[j] = np.float32(a + b)
                buf[j + h] = np.float32(a - b)
        h *= 2
    for i in range(n):
        buf[i] = np.float32(buf[i] * scale)


def hadamard_scale(n: int) -> np.float32:
    """The entry magnitude of the reference ``hadamard(n)``: ``fl32(1 / fl32(sqrt n))``."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return np.float32(np.float32(1.0) / np.float32(n ** 0.5))


@njit_kernel
def column_sums(p, out):
    """``out[j] = Σ_r p[r, j]`` in the order of torch's ``sum`` over a non-innermost dim
    (ATen ``SumKernel.cpp`` ``row_sum``: rows added sequentially in chunks of
    ``2^max(4, ceil_log2(n)/4)`` into a 4-level cascade; sequential for n <= 16)."""
    n, nk = p.shape
    lp = max(4, _ceil_log2(n) // 4)
    step = 1 << lp
    lmask = step - 1
    acc = np.zeros((4, nk), np.float32)
    i = 0
    while i + step <= n:
        for _ in range(step):
            for j in range(nk):
                acc[0, j] += p[i, j]
            i += 1
        for lv in range(1, 4):
            for j in range(nk):
                acc[lv, j] += acc[lv - 1, j]
                acc[lv - 1, j] = np.float32(0.0)
            if (i & (lmask << (lv * lp))) != 0:
                break
    while i < n:
        for j in range(nk):
            acc[0, j] += p[i, j]
        i += 1
    for lv in range(1, 4):
        for j in range(nk):
            acc[0, j] += acc[lv, j]
    for j in range(nk):
        out[j] = acc[0, j]


# --------------------------------------------------------------------------- W8A8 pieces
#: Register-tile heights (tokens) of the per-head VNNI GEMM; one 16-column weight block per
#: tile, so a head's packed weights ([HD/16][Kp/4][16][4], contiguous) stream sequentially.
TILE_HEIGHTS = (1, 2, 4, 8, 16)
_PREFETCH = {1: 0, 2: 0, 4: 1024, 8: 2048, 16: 4096}
(_V1, _V2, _V4, _V8, _V16) = [vnni_bcast_tile(tt, 1, _PREFETCH[tt]) for tt in TILE_HEIGHTS]


@njit_kernel
def _vtile(tt, xp, x_off, xks, wp, w_off, nkg, acc, a_off, ats):
    if tt == 1:
        _V1(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 2:
        _V2(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 4:
        _V4(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 8:
        _V8(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    else:
        _V16(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)


@njit_kernel
def acc_cols_vnni(xp, TP, KG, wp, b0, nblk, acc):
    """u8·s8 int32 accumulators (zero point not yet removed) of the ``16·nblk`` output
    columns starting at block ``b0`` for all ``TP`` packed token rows:
    ``acc[t·ncols + c]``. Token tiles run inside the block loop, so a block's weights
    (16·Kp bytes) are reused from L1 by every tile."""
    ncols = nblk * 16
    wbs = KG * 64
    xks = TP * 4
    for j in range(nblk):
        w_off = (b0 + j) * wbs
        t0 = 0
        while t0 < TP:
            tt = min(16, TP - t0)
            _vtile(tt, xp, t0 * 4, xks, wp, w_off, KG, acc, t0 * ncols + j * 16, ncols)
            t0 += tt


@njit_kernel
def dot_i8(a, b):
    """Exact int32 dot product of two int8 vectors (int32 wraps keep ``vpmaddwd``)."""
    s = np.int32(0)
    for k in range(a.size):
        s = np.int32(s + np.int32(a[k]) * np.int32(b[k]))
    return s


@njit_kernel
def acc_cols_plain(xq, T, wq, n0, ncols, acc):
    """Exact int32 ``acc[t·ncols + c] = xq[t] · wq[n0 + c]`` (fallback, no intrinsics)."""
    for c in range(ncols):
        wr = wq[n0 + c]
        for t in range(T):
            acc[t * ncols + c] = dot_i8(xq[t], wr)


@njit_kernel
def pack_row(q, xp, t, TP, KG):
    """Scatter int8 row ``q`` into the ``[KG][TP][4]`` u8 layout as ``q + 128``."""
    K = q.size
    xks = TP * 4
    for k in range(K):
        xp[(k >> 2) * xks + t * 4 + (k & 3)] = np.uint8(np.int32(q[k]) + 128)
    for k in range(K, KG * 4):
        xp[(k >> 2) * xks + t * 4 + (k & 3)] = np.uint8(128)


@njit_kernel
def pack_pad(xp, T, TP, KG):
    """Token rows ``T..TP-1`` of the packed layout = u8 128 (q = 0)."""
    xks = TP * 4
    for kg in range(KG):
        for i in range(T * 4, TP * 4):
            xp[kg * xks + i] = np.uint8(128)


@njit_kernel
def quant_into(buf, qmode, t, TP, KG, xp, xq, sx):
    """Quantise float32 row ``buf`` of token ``t`` (bit-exact golden ``quant_per_row``):
    ``qmode`` 1 -> packed VNNI row in ``xp``, 2 -> ``xq[t]``; scale -> ``sx[t]``."""
    if qmode == 1:
        q = np.empty(buf.size, np.int8)
        sx[t] = quant_row_f32(buf, q)
        pack_row(q, xp, t, TP, KG)
    elif qmode == 2:
        sx[t] = quant_row_f32(buf, xq[t])


@njit_kernel
def quant_act(x, qmode, TP, KG, xp, xq, sx):
    """Per-token INT8 quantisation of float32 ``x`` [T, K] into the layout of ``qmode``."""
    T, K = x.shape
    for t in range(T):
        buf = np.empty(K, np.float32)
        for i in range(K):
            buf[i] = x[t, i]
        quant_into(buf, qmode, t, TP, KG, xp, xq, sx)
    if qmode == 1:
        pack_pad(xp, T, TP, KG)


# --------------------------------------------------------------------------- head epilogues
#: rnd(dtype) -> unweighted RMSNorm -> RoPE                   (qkv: q heads)
MODE_QNORM_ROPE = 1
#: rnd(dtype) -> RoPE (rounded to dtype)                      (indexer float q)
MODE_ROPE = 2
#: rnd(dtype) -> RoPE (rounded to bf16) -> Hadamard -> INT8   (indexer INT8 q)
MODE_ROPE_HAD_Q8 = 3


@njit_kernel
def head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s):
    """Finish one (token, head) row ``buf`` [HD] of a linear output in place and store it:
    ``out_f[t, h]`` (float modes) or ``out_q[t, h]`` + ``out_s[t, h]`` (INT8 mode)."""
    HD = buf.size
    for i in range(HD):
        buf[i] = rnd(buf[i], to_bf16)
    if mode == MODE_ROPE_HAD_Q8:  # apply_rope(..., torch.bfloat16): nope lanes -> bf16 too
        for i in range(HD - 2 * cos.shape[1]):
            buf[i] = rnd(buf[i], True)
        rope(buf, cos[t], sin[t], True)
        fwht(buf, had_scale)
        out_s[t, h] = quant_row_f32(buf, out_q[t, h])
        return
    if mode == MODE_QNORM_ROPE:
        norm_unweighted(buf, eps, to_bf16)
    rope(buf, cos[t], sin[t], to_bf16)
    o = out_f[t, h]
    for i in range(HD):
        o[i] = buf[i]


@njit_kernel(parallel=True)
def heads_vnni(xp, TP, KG, wp, wsum128, sx, sw, T, H, HD, mode, to_bf16, eps, cos, sin,
               had_scale, out_f, out_q, out_s):
    """Per-head W8A8 GEMM (VNNI) + dequant + :func:`head_epilogue`; one head per
    ``prange`` iteration. Needs ``HD % 16 == 0`` and a ``vnni``-packed weight."""
    nblk = HD // 16
    for h in prange(H):
        acc = np.empty(TP * HD, np.int32)
        acc_cols_vnni(xp, TP, KG, wp, h * nblk, nblk, acc)
        buf = np.empty(HD, np.float32)
        n0 = h * HD
        for t in range(T):
            st = sx[t]
            for i in range(HD):
                n = n0 + i
                a = np.float32(np.int32(acc[t * HD + i] - wsum128[n]))
                buf[i] = np.float32(np.float32(a * st) * sw[n])
            head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s)


@njit_kernel(parallel=True)
def heads_generic(int8, y, xq, sx, wq, sw, T, H, HD, mode, to_bf16, eps, cos, sin, had_scale,
                  out_f, out_q, out_s):
    """The intrinsic-free sibling of :func:`heads_vnni`, one head per ``prange``
    iteration: with ``int8`` the W8A8 GEMM as plain exact int32 dot products on the
    ``[N, K]`` int8 weight ``wq`` (fallback: no VNNI or ``HD % 16 != 0``) + dequant; else
    the rows of a float linear output ``y`` [T, H·HD]. Then :func:`head_epilogue`."""
    for h in prange(H):
        n0 = h * HD
        acc = np.empty(T * HD if int8 else 0, np.int32)
        if int8:
            acc_cols_plain(xq, T, wq, n0, HD, acc)
        buf = np.empty(HD, np.float32)
        for t in range(T):
            if int8:
                st = sx[t]
                for i in range(HD):
                    buf[i] = np.float32(np.float32(np.float32(acc[t * HD + i]) * st) * sw[n0 + i])
            else:
                for i in range(HD):
                    buf[i] = y[t, n0 + i]
            head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s)


def heads_float(y: np.ndarray, T: int, H: int, HD: int, mode: int, to_bf16: bool, eps, cos, sin,
                had_scale, out_f, out_q, out_s) -> None:
    """:func:`head_epilogue` over the rows of a float linear output ``y`` [T, H·HD]."""
    heads_generic(False, y, _NO_I8, _NO_SX, _NO_I8, _NO_SX, T, H, HD, mode, to_bf16, np.float32(eps),
                  cos, sin, np.float32(had_scale), out_f, out_q, out_s)


_NO_F = np.zeros((1, 1, 1), np.float32)
_NO_Q = np.zeros((1, 1, 1), np.int8)
_NO_S = np.zeros((1, 1), np.float32)
_NO_U8 = np.zeros(1, np.uint8)
_NO_I8 = np.zeros((1, 1), np.int8)
_NO_SX = np.zeros(1, np.float32)
_NO_Y = np.zeros((1, 1), np.float32)


def quantize_activations(x: np.ndarray, pw: PackedW8A8) -> tuple:
    """Per-token INT8 of float32 ``x`` [T, K] for ``pw``'s kernel family: returns
    ``(xp_or_xq, sx, TP)``."""
    T, K = x.shape
    sx = np.empty(T, np.float32)
    if pw.layout == "vnni":
        TP = padded_rows(T)
        xp = np.empty(pw.kp * TP, np.uint8)
        quant_act(x, 1, TP, pw.kp // 4, xp, _NO_I8, sx)
        return xp, sx, TP
    xq = np.empty((T, K), np.int8)
    quant_act(x, 2, T, 1, _NO_U8, xq, sx)
    return xq, sx, T


def run_heads_w8a8(act: tuple, pw: PackedW8A8, T: int, H: int, HD: int, mode: int,
                   to_bf16: bool, eps: float, cos: np.ndarray, sin: np.ndarray,
                   had_scale: float, out_f: np.ndarray, out_q: np.ndarray,
                   out_s: np.ndarray) -> None:
    """Dispatch the per-head W8A8 kernel for quantised activations ``act``
    (from :func:`quantize_activations`)."""
    xa, sx, TP = act
    if pw.layout == "vnni":
        heads_vnni(xa, TP, pw.kp // 4, pw.data, pw.wsum128, sx, pw.scale, T, H, HD, mode,
                   to_bf16, np.float32(eps), cos, sin, np.float32(had_scale), out_f, out_q, out_s)
    else:
        heads_generic(True, _NO_Y, xa, sx, pw.data, pw.scale, T, H, HD, mode, to_bf16,
                      np.float32(eps), cos, sin, np.float32(had_scale), out_f, out_q, out_s)


def check_quant_weight(w: QuantWeight, n_out: int, k_in: int, name: str) -> None:
    if tuple(w.qweight.shape) != (n_out, k_in):
        raise ValueError(f"{name}: expected [{n_out}, {k_in}], got {tuple(w.qweight.shape)}")


# =========================================================================== qkv_proj_rope
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
        pw = packed_w8a8(wq_b, plain=HD % 16 != 0)
        sx = np.empty(T, np.float32)
        if pw.layout == "vnni":
            TP = padded_rows(T)
            xp = np.empty(pw.kp * TP, np.uint8)
            _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 1, TP, pw.kp // 4, qres, kv, xp,
                     _NO_I8, sx)
            act = (xp, sx, TP)
        else:
            xq = np.empty((T, QL), np.int8)
            _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 2, T, 1, qres, kv, _NO_U8, xq, sx)
            act = (xq, sx, T)
        if T:
            run_heads_w8a8(act, pw, T, H, HD, MODE_QNORM_ROPE, to_bf16, eps, c, s, 1.0, q,
                           _NO_Q, _NO_S)
    else:
        _qkv_pre(aq, akv, qnw, kvnw, c, s, eps32, to_bf16, 0, T, 1, qres, kv, _NO_U8, _NO_I8,
                 np.empty(1, np.float32))
        y, _ = linear_pair(torch.from_numpy(qres), wq_b, None, dtype)
        if T:
            heads_float(y, T, H, HD, MODE_QNORM_ROPE, to_bf16, eps32, c, s, np.float32(1.0), q,
                        _NO_Q, _NO_S)
    return torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(qres)
