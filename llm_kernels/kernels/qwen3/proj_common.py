"""Shared machinery of the fused Qwen3 projection stages (:mod:`.qkv_proj`, :mod:`.o_proj`,
:mod:`.mlp`): one GEMM per stage with the stage's prologue and epilogue fused around it.

Stage = ``prologue -> GEMM over a concatenated weight -> per-tile epilogue -> post pass``:

* **prologue** (per token row, ``prange``): optional Qwen3 RMSNorm ``rnd(γ·rnd(x·r))``,
  ``r = 1/sqrt(fl(Σx²/D) + eps)`` with ``Σx²`` in torch's summation order
  (:func:`common.norm_rope.sumsq_torch_order`), then — W8A8 — the bit-exact per-token INT8
  quantisation (:func:`common.quant.quant_row_f32`) and the VNNI activation pack, or —
  bf16 GEMV — the bf16 bits of the row.
* **GEMM**, one pass over the weights for all tokens:

  - W8A8 (``QuantWeight`` weights): the weights of a stage are concatenated once into one
    INT8 matrix and packed with :func:`common.gemm.pack_w8a8` — at load time by
    :func:`prepare_stage` (run by :mod:`.prepare`), or for the call when the stage is given
    unprepared ``QuantWeight`` s. Segments (q | k | v) start on 64-row chunk
    boundaries (zero rows in between); gate/up are interleaved per chunk as 32 gate rows
    then the same 32 up rows, so every 64-column output tile holds matching g and u. Each
    ``prange`` iteration computes one chunk with common's VNNI register tiles
    (``gemm.chunk_acc``) or, on the fallback path, exact int32 dot products
    (``gemm.dot_i8``) and runs the epilogue on it right away.
  - bf16 (bfloat16 weights, bf16 mode, AVX512_BF16, ``T <= BF16_GEMV_MAX_T``):
    ``vdpbf16ps`` row-dot tiles on the weights' natural ``[N, K]`` layout (no copy), one
    ``prange`` over row blocks of all the stage's weights. Otherwise torch's ``F.linear``
    exactly as the reference (fp32 mode always).
* **epilogue** (in the tile): W8A8 dequant ``fl(fl(f32(acc)·s_x)·s_w)`` (golden order),
  then per stage: split into q/k/v ``rnd(y)``; residual ``rnd(res + rnd(y))``; SwiGLU
  ``rnd(rnd(silu(rnd(g)))·rnd(u))`` with torch's ``x/(1+exp(-x))`` and SLEEF's ``expf``.
* **post pass** (o_proj): RMSNorm of the finished rows ``h`` (one ``prange`` over rows).

Numerics: the W8A8 path reproduces every rounding of the reference (same normalised row,
same quantised inputs, exact int32 GEMM, same dequant and epilogue order), so it is
bitwise equal to ``reference.qwen3``. SiLU is bitwise too: torch's fp32 ``silu`` runs SLEEF's
``expf`` in its vectorised loop but libm's ``expf`` on the last ``len % 32`` elements of each
``at::parallel_for`` chunk; :func:`torch_tails` computes those ranges (they depend on
``torch.get_num_threads()``) and the epilogue uses libm there (the two ``expf`` differ in
~5 % of the tail elements). The torch-GEMM path is bitwise as well. The bf16 GEMV differs
from oneDNN only in the fp32 summation order of exact bf16 products: a projection output
is within 1 bf16 ulp of the reference, one more rounded op (SwiGLU, the norm of h) makes
it 2 (an fp32 summation difference of ~K·2^-24·Σ|x·w| can exceed that only under heavy
cancellation, i.e. for outputs near 0: tested with a 1e-6 absolute slack).

Determinism: every output element belongs to one ``prange`` iteration with a fixed order.

Measured (``benchmarks/bench_qwen3_proj.py``, Qwen3-32B dims, 2-core Zen 5, bandwidth probed
next to every call; it was ~54 GB/s in the W8A8 blocks of the reported run): W8A8 at T=1
91-98 % of the DRAM roofline, T=4 85-101 %, T=16 78-86 % (compute-bound once the bandwidth is
~85 GB/s: 59-68 %); 76-191x the float64-golden reference. bf16 GEMV at ~83 GB/s: T=1 75-95 %
(2.7-3.4x torch), T=4 55-65 % (1.4-1.8x).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.quant import QuantWeight
from ..common import jit
from ..common.bf16 import f32_to_bf16_bits, load_f32, torch_bf16_as_u16
from ..common.bf16 import round_f32 as rnd
from ..common.gemm import CHUNK_N, chunk_acc, dot_i8, pack_q32, pack_w8a8, padded_tokens
from ..common.gemm_pack import is_tiled
from ..common.jit import njit_kernel
from ..common.linear import linear as _common_linear
from ..common.norm_rope import sumsq_torch_order
from ..common.prepared import PackedRows, stage_group
from ..common.quant import quant_row_f32
from ..common.x86 import bf16_dot_tile as _bf16_dot_tile
from .group_stage import group_linears
from .swiglu_torch import in_tail, swiglu_scalar, torch_tails

__all__ = ["BF16_GEMV_MAX_T", "MODE_RES", "MODE_SPLIT", "MODE_SWIGLU", "Plan", "ProjW8A8", "check_dtype",
           "pack_stage", "prepare_stage", "rows", "same_rows", "stage_w8a8", "torch_tails", "vec_f32",
           "weight_kind", "wrap"]

MODE_SPLIT, MODE_RES, MODE_SWIGLU = 0, 1, 2
_HALF = CHUNK_N // 2
_ONE = np.float32(1.0)
#: Largest token count for the Numba bf16 GEMV (above: torch/oneDNN). Measured at Qwen3-32B
#: dims (``benchmarks/bench_qwen3_proj.py``, fused/gemv vs fused/onednn): the GEMV is 2.7-3.4x
#: faster at T=1, 1.5-1.9x at T=4, and at T=16 1.2-1.3x faster in 3 of 4 stages (~equal or
#: up to 12 % slower in some runs).
BF16_GEMV_MAX_T = 16
USE_BF16_GEMV = jit.USE_BF16
#: Tests may set this to the process's tile layout (``jit.INT8_TILE``) / "nk" to force a
#: W8A8 kernel family in-process.
FORCE_LAYOUT: str | None = None


# --------------------------------------------------------------------------- host checks
def check_dtype(dtype: Any) -> bool:
    """True for bf16 mode; raises ValueError unless ``dtype`` is float32 or bfloat16."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype == torch.bfloat16


def vec_f32(w: Any, name: str, n: int) -> np.ndarray:
    """A ``[n]`` float vector (norm gain) as float32 numpy. Raises TypeError/ValueError."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating torch.Tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if tuple(w.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(w.shape)}")
    return w.detach().float().contiguous().numpy()


def weight_kind(ws: tuple, names: tuple, k: int | None) -> str:
    """"w8a8" (all QuantWeight), "group" (all GroupQuantWeight: group-scaled INT8, run as
    one fused group-scaled GEMM per weight, then the float path's epilogue), "float" (all
    2-D float tensors) or "mixed"; checks that
    every weight's in-dim is ``k`` (the first weight's if None). Raises TypeError/ValueError
    naming the offending weight."""
    kinds = set()
    for w, nm in zip(ws, names):
        if isinstance(w, QuantWeight):
            kinds.add("w8a8")
        elif isinstance(w, GroupQuantWeight):
            kinds.add("group")
        elif isinstance(w, torch.Tensor) and w.dtype.is_floating_point and w.dim() == 2:
            kinds.add("float")
        else:
            raise TypeError(f"{nm}: expected a QuantWeight or a 2-D float tensor [out, in], "
                            f"got {getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        k = w.shape[1] if k is None else k
        if w.shape[1] != k:
            raise ValueError(f"{nm}: in-dim is {w.shape[1]}, expected {k}")
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --------------------------------------------------------------------------- W8A8 packing
class ProjW8A8:
    """Concatenated, packed INT8 weight of one stage (the ``group`` of its prepared weights).

    ``pk``: :class:`common.gemm.PackedW8A8` of the ``[Np, K]`` concatenation; ``seg``: int64
    ``[6]`` = (start, rows) of up to 3 segments in the padded row space (SwiGLU: ``(0, I)``);
    ``n_out``: output widths; ``zeros``: int32 ``[Np]`` (zero-point term of the plain path);
    ``mode``: the stage mode; ``n_members``: the number of weights packed together."""

    __slots__ = ("k", "mode", "n_members", "n_out", "pk", "seg", "zeros")

    def __init__(self, pk, seg, n_out, k, mode, n_members):
        self.pk, self.seg, self.n_out, self.k = pk, seg, n_out, k
        self.mode, self.n_members = mode, n_members
        self.zeros = np.zeros(pk.np_ if is_tiled(pk.layout) else pk.n, np.int32)


def _layout() -> str:
    return FORCE_LAYOUT or (jit.INT8_TILE if jit.USE_INT8_TILES else "nk")


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    return a if a.shape[0] == n else np.concatenate([a, np.zeros((n - a.shape[0],) + a.shape[1:], a.dtype)])


def _build_w8a8(qws: tuple, mode: int, layout: str) -> ProjW8A8:
    K = qws[0].shape[1]
    q = [w.qweight.detach().contiguous().numpy() for w in qws]
    s = [w.scale.detach().float().contiguous().numpy() for w in qws]
    n_out = tuple(a.shape[0] for a in q)
    seg = np.zeros(6, np.int64)
    if mode == MODE_SWIGLU:  # per 64-row chunk: 32 gate rows, then the same 32 up rows
        n_out = n_out[:1]
        nc = -(-n_out[0] // _HALF)
        wq = np.empty((nc, 2, _HALF, K), np.int8)
        sc = np.empty((nc, 2, _HALF), np.float32)
        for j in range(2):
            wq[:, j] = _pad_rows(q[j], nc * _HALF).reshape(nc, _HALF, K)
            sc[:, j] = _pad_rows(s[j], nc * _HALF).reshape(nc, _HALF)
        wq, sc, seg[1] = wq.reshape(-1, K), sc.reshape(-1), n_out[0]
    else:  # segments padded to whole 64-row chunks, so that no chunk straddles two outputs
        pads = [-(-n // CHUNK_N) * CHUNK_N for n in n_out] if len(q) > 1 else list(n_out)
        wq = np.concatenate([_pad_rows(a, p) for a, p in zip(q, pads)]) if len(q) > 1 else q[0]
        sc = np.concatenate([_pad_rows(a, p) for a, p in zip(s, pads)]) if len(q) > 1 else s[0]
        seg[0:2 * len(q):2] = np.cumsum([0] + pads[:-1])
        seg[1:2 * len(q):2] = n_out
    return ProjW8A8(pack_w8a8(wq, sc, layout), seg, n_out, K, mode, len(qws))


def pack_stage(qws: tuple, mode: int) -> ProjW8A8:
    """Pack the QuantWeights ``qws`` of one stage (1-3 of them for split or residual stages,
    (gate, up) for SwiGLU) into one :class:`ProjW8A8` in the active kernel layout."""
    return _build_w8a8(tuple(qws), mode, _layout())


def _prepared(qws: tuple, mode: int) -> ProjW8A8 | None:
    g = stage_group(tuple(qws), ProjW8A8)
    return g if g is not None and g.mode == mode and g.pk.layout == _layout() else None


def prepare_stage(qws: tuple, mode: int) -> tuple[PackedRows, ...]:
    """Load-time form of a stage's QuantWeights: one :class:`PackedRows` per weight, all
    sharing the stage's :class:`ProjW8A8` (which no longer references the raw int8
    tensors, except a single ``"nk"`` weight whose packed data is that tensor)."""
    if _prepared(qws, mode) is not None:
        return tuple(qws)
    g = pack_stage(qws, mode)
    if mode == MODE_SWIGLU:
        return tuple(PackedRows(g, j, g.pk, w.scale, w.shape[0], interleave=j) for j, w in enumerate(qws))
    return tuple(PackedRows(g, i, g.pk, w.scale, w.shape[0], start=int(g.seg[2 * i])) for i, w in enumerate(qws))


def stage_w8a8(qws: tuple, mode: int) -> ProjW8A8:
    """The :class:`ProjW8A8` a stage runs on: the prepared one (``qws`` made by
    :func:`prepare_stage` for this mode and the active layout), else packed for this call."""
    g = _prepared(qws, mode)
    return g if g is not None else pack_stage(qws, mode)


# --------------------------------------------------------------------------- scalar pieces
@njit_kernel
def _deq(a, ws, sx, sw):
    """W8A8 dequant in the golden order: ``fl(fl(f32(acc)·s_x)·s_w)`` (``acc = a - ws``)."""
    return np.float32(np.float32(np.float32(np.int32(a - ws)) * sx) * sw)


@njit_kernel
def _norm_row(src, w, eps, to_bf16, acc, out):
    """Qwen3 RMSNorm of one row: ``out = rnd(w·rnd(src·r))``, ``r = 1/sqrt(fl(Σsrc²/D)+eps)``
    (reference ``qwen3.common.rms_norm``; ``acc`` float32 [4, 32] scratch)."""
    D = src.size
    ms = np.float32(sumsq_torch_order(src, acc) / np.float32(D))
    r = np.float32(_ONE / np.float32(np.sqrt(np.float32(ms + eps))))
    for i in range(D):
        out[i] = rnd(np.float32(w[i] * rnd(np.float32(src[i] * r), to_bf16)), to_bf16)


@njit_kernel(parallel=True)
def _prologue(x, nw, eps, do_norm, to_bf16, q, sx):
    """Per row t: (norm) + bit-exact INT8 quantisation into ``q[t, :K]`` and ``sx[t]``."""
    T, K = x.shape
    for t in prange(T):
        buf = np.empty(K, np.float32)
        if do_norm:
            _norm_row(x[t], nw, eps, to_bf16, np.empty((4, 32), np.float32), buf)
        else:
            buf[:] = x[t]
        sx[t] = quant_row_f32(buf, q[t, :K])


@njit_kernel(parallel=True)
def _norm_kernel(x, w, eps, to_bf16, out):
    """``out[t] = rms_norm(x[t])`` for every row (``prange`` over rows)."""
    for t in prange(x.shape[0]):
        _norm_row(x[t], w, eps, to_bf16, np.empty((4, 32), np.float32), out[t])


@njit_kernel
def _epilogue(mode, acc, n0, T, ws, sw, sx, to_bf16, seg, tails, res, o0, o1, o2):
    """Epilogue of the 64-row chunk starting at padded row ``n0`` from its int32 ``acc``
    ``[T, 64]`` (flat, row stride 64); ``ws`` = the zero-point term to subtract; ``tails``:
    :func:`torch_tails` of the SwiGLU output (those elements use libm ``expf``)."""
    if mode == MODE_SWIGLU:
        j0 = n0 // 2
        m = min(_HALF, seg[1] - j0)
        wg, wu = ws[n0:n0 + m], ws[n0 + _HALF:n0 + _HALF + m]
        sg, su = sw[n0:n0 + m], sw[n0 + _HALF:n0 + _HALF + m]
        for t in range(T):
            a = acc[t * CHUNK_N:t * CHUNK_N + m]
            b = acc[t * CHUNK_N + _HALF:t * CHUNK_N + _HALF + m]
            s = sx[t]
            o = o0[t, j0:j0 + m]
            for i in range(m):
                g = rnd(_deq(a[i], wg[i], s, sg[i]), to_bf16)
                u = rnd(_deq(b[i], wu[i], s, su[i]), to_bf16)
                o[i] = swiglu_scalar(g, u, to_bf16, False)
            base = t * seg[1] + j0
            for k in range(tails.shape[0]):
                for i in range(max(tails[k, 0], base) - base, min(tails[k, 1], base + m) - base):
                    g = rnd(_deq(a[i], wg[i], s, sg[i]), to_bf16)
                    u = rnd(_deq(b[i], wu[i], s, su[i]), to_bf16)
                    o[i] = swiglu_scalar(g, u, to_bf16, True)
        return
    si = 0
    for j in range(1, 3):
        if seg[2 * j + 1] > 0 and n0 >= seg[2 * j]:
            si = j
    c0 = n0 - seg[2 * si]
    m = min(CHUNK_N, seg[2 * si + 1] - c0)
    if m <= 0:
        return
    dst = o0 if si == 0 else (o1 if si == 1 else o2)
    w_, s_ = ws[n0:n0 + m], sw[n0:n0 + m]
    for t in range(T):
        a = acc[t * CHUNK_N:t * CHUNK_N + m]
        s = sx[t]
        o = dst[t, c0:c0 + m]
        if mode == MODE_RES:
            r = res[t, c0:c0 + m]
            for i in range(m):
                o[i] = rnd(np.float32(r[i] + rnd(_deq(a[i], w_[i], s, s_[i]), to_bf16)), to_bf16)
        else:
            for i in range(m):
                o[i] = rnd(_deq(a[i], w_[i], s, s_[i]), to_bf16)


# --------------------------------------------------------------------------- W8A8 stages
@njit_kernel(parallel=True)
def _stage_vnni(x, nw, eps, do_norm, post, to_bf16, KG, TP, wp, NP, ws128, sw, mode, seg, tails, res,
                o0, o1, o2):
    """Prologue (norm, quantise, pack) + VNNI GEMM with the fused epilogue (+ post norm of
    the ``o0`` rows into ``o1`` when ``post``), one call."""
    T = x.shape[0]
    q = np.zeros((T, KG * 4), np.int8)
    sx = np.empty(T, np.float32)
    _prologue(x, nw, eps, do_norm, to_bf16, q, sx)
    xp = np.empty(KG * 4 * TP, np.uint8)
    pack_q32(q.view(np.uint32), xp.view(np.uint32), T, TP)
    for c in prange(NP // CHUNK_N):
        acc = np.empty(TP * CHUNK_N, np.int32)
        chunk_acc(c, xp, TP, KG, wp, acc)
        _epilogue(mode, acc, c * CHUNK_N, T, ws128, sw, sx, to_bf16, seg, tails, res, o0, o1, o2)
    if post:
        _norm_kernel(o0, nw, eps, to_bf16, o1)


@njit_kernel(parallel=True)
def _stage_plain(x, nw, eps, do_norm, post, to_bf16, wq, zeros, sw, mode, seg, tails, res, o0, o1, o2):
    """Fallback: prologue + exact int32 dot products on the ``[N, K]`` weight, same epilogue."""
    T, K = x.shape
    q = np.zeros((T, K), np.int8)
    sx = np.empty(T, np.float32)
    _prologue(x, nw, eps, do_norm, to_bf16, q, sx)
    N = wq.shape[0]
    for c in prange((N + CHUNK_N - 1) // CHUNK_N):
        acc = np.zeros(T * CHUNK_N, np.int32)
        n0 = c * CHUNK_N
        for n in range(n0, min(N, n0 + CHUNK_N)):
            wr = wq[n]
            for t in range(T):
                acc[t * CHUNK_N + n - n0] = dot_i8(q[t], wr)
        _epilogue(mode, acc, n0, T, zeros, sw, sx, to_bf16, seg, tails, res, o0, o1, o2)
    if post:
        _norm_kernel(o0, nw, eps, to_bf16, o1)


# --------------------------------------------------------------------------- bf16 GEMV
#: vdpbf16ps row-dot tiles: token-tile height -> weight rows per tile; a 1x1 tile for the
#: remainder rows at the end of a weight.
_BF_NR = {1: 8, 2: 8, 4: 5}
_B18, _B28, _B45 = (_bf16_dot_tile(t, r) for t, r in _BF_NR.items())
_B11 = _bf16_dot_tile(1, 1)


@njit_kernel
def _bf_block(w, r0, rows, nr, tp, t0, T, xb, xr, nk, sc):
    """``sc[t*nr + r] = Σ_k x[t0+t, k]·w[r0+r, k]`` (fp32) for ``r < rows``, ``t < tp``:
    vdpbf16ps tiles over the first ``32·nk`` k, the remaining k in fp32 (exact products)."""
    K = w.shape[1]
    wf = w.reshape(-1)
    xf = xb.reshape(-1)
    if rows < nr:
        for r in range(rows):
            for t in range(tp):
                _B11(xf, (t0 + t) * K, K, wf, (r0 + r) * K, K, nk, sc, t * nr + r)
    elif tp == 1:
        _B18(xf, t0 * K, K, wf, r0 * K, K, nk, sc, 0)
    elif tp == 2:
        _B28(xf, t0 * K, K, wf, r0 * K, K, nk, sc, 0)
    else:
        _B45(xf, t0 * K, K, wf, r0 * K, K, nk, sc, 0)
    for t in range(min(tp, T - t0)):
        xrow = xr[t0 + t]
        for r in range(rows):
            wr = w[r0 + r]
            s = sc[t * nr + r]
            for k in range(nk * 32, K):
                s = np.float32(s + np.float32(xrow[k] * load_f32(wr[k])))
            sc[t * nr + r] = s


@njit_kernel(parallel=True)
def _stage_bf16(x, nw, eps, do_norm, post, tp, nr, w0, w1, w2, mode, tails, res, o0, o1, o2):
    """bf16 mode, bf16 weights (uint16 bits ``[N, K]``): prologue (norm or bf16 rounding)
    + vdpbf16ps GEMV over all weights of the stage + fused epilogue, one call."""
    T, K = x.shape
    TP = (T + tp - 1) // tp * tp
    nk = K // 32
    xb = np.zeros((TP, K), np.uint16)
    xr = np.empty((T, K), np.float32)
    for t in prange(T):
        if do_norm:
            _norm_row(x[t], nw, eps, True, np.empty((4, 32), np.float32), xr[t])
        else:
            for i in range(K):
                xr[t, i] = rnd(x[t, i], True)
        for i in range(K):
            xb[t, i] = f32_to_bf16_bits(xr[t, i])
    b0 = (w0.shape[0] + nr - 1) // nr
    b1 = 0 if mode == MODE_SWIGLU else (w1.shape[0] + nr - 1) // nr
    b2 = 0 if mode == MODE_SWIGLU else (w2.shape[0] + nr - 1) // nr
    for it in prange(b0 + b1 + b2):
        sc = np.empty(tp * nr, np.float32)
        sc2 = np.empty(tp * nr, np.float32)
        wi = 0 if it < b0 else (1 if it < b0 + b1 else 2)
        w = w0 if wi == 0 else (w1 if wi == 1 else w2)
        dst = o0 if wi == 0 else (o1 if wi == 1 else o2)
        r0 = (it - (0 if wi == 0 else (b0 if wi == 1 else b0 + b1))) * nr
        rows = min(nr, w.shape[0] - r0)
        for t0 in range(0, TP, tp):
            _bf_block(w, r0, rows, nr, tp, t0, T, xb, xr, nk, sc)
            if mode == MODE_SWIGLU:
                _bf_block(w1, r0, rows, nr, tp, t0, T, xb, xr, nk, sc2)
            for t in range(t0, min(t0 + tp, T)):
                j = (t - t0) * nr
                for r in range(rows):
                    y = rnd(sc[j + r], True)
                    if mode == MODE_SWIGLU:
                        y = swiglu_scalar(y, rnd(sc2[j + r], True), True, in_tail(t * w0.shape[0] + r0 + r, tails))
                    elif mode == MODE_RES:
                        y = rnd(np.float32(res[t, r0 + r] + y), True)
                    dst[t, r0 + r] = y
    if post:
        _norm_kernel(o0, nw, eps, True, o1)


# --------------------------------------------------------------------------- torch-GEMM epilogue
@njit_kernel(parallel=True)
def _epi_float(mode, y0, y1, tails, res, to_bf16, nw, eps, post, o0, o1):
    """Epilogue on float GEMM outputs (torch path): residual ``rnd(res + rnd(y0))`` or SwiGLU
    of ``(y0, y1)``, ``prange`` over (row, 2048-column block); then (``post``) the RMSNorm
    of the ``o0`` rows into ``o1``."""
    T, N = o0.shape
    nb = (N + 2047) // 2048
    for i in prange(T * nb):
        t = i // nb
        c0 = (i - t * nb) * 2048
        for c in range(c0, min(N, c0 + 2048)):
            g = rnd(y0[t, c], to_bf16)
            if mode == MODE_SWIGLU:
                o0[t, c] = swiglu_scalar(g, rnd(y1[t, c], to_bf16), to_bf16, in_tail(t * N + c, tails))
            else:
                o0[t, c] = rnd(np.float32(res[t, c] + g), to_bf16)
    if post:
        _norm_kernel(o0, nw, eps, to_bf16, o1)


def _float_linear(x: np.ndarray, w: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """The reference ``linear`` for a float weight (torch GEMM, one rounding to ``dtype``);
    for a group-scaled INT8 weight the fused group-scaled GEMM (bitwise the golden), rounded."""
    xt = torch.from_numpy(x)
    if isinstance(w, GroupQuantWeight):
        return _common_linear(xt, w, dtype).contiguous().numpy()
    if dtype == torch.float32:
        y = F.linear(xt, w.detach().float())
    else:
        y = F.linear(xt.to(dtype), w.detach().to(dtype)).float()
    return y.contiguous().numpy()


def _bf16_view(w: torch.Tensor) -> np.ndarray:
    return torch_bf16_as_u16(w.detach().contiguous())


_F0 = np.zeros((1, 1), np.float32)
_W0 = np.zeros((0, 32), np.uint16)
_NO_TAILS = np.zeros((0, 2), np.int64)
_TPS = [padded_tokens(t) for t in range(65)]


class Plan:
    """One stage bound to its weights: validated shapes and every constant kernel argument
    (packed / viewed weights, float32 norm gain, eps), built per call by the stage
    function (cheap: the weights are prepared at load, see :mod:`.prepare`);
    ``plan(x, res)`` runs the stage on float32 rows
    ``x [T, k]`` (``res [T, n_out[0]]`` for the residual mode) and returns the float32
    outputs: one per weight (split), ``[out]``, or ``[h, rms_norm(h)]`` (``post``).

    ``ws``: the stage's weights (split: 1-3; residual: 1; SwiGLU: (gate, up)), all of
    ``kind`` ("w8a8" / "float"; "mixed" = split stage whose weights run one by one after
    the prologue). ``nw``: float32 gain of the input norm (``post=False``) or of the post
    norm (``post=True``) or None."""

    __slots__ = ("cols", "do_norm", "dtype", "e32", "k", "kind", "kw", "mode", "n_out", "nw", "post", "pw",
                 "subs", "to_bf16", "wa", "ws")

    def __init__(self, ws: tuple, mode: int, dtype: torch.dtype, kind: str, nw: np.ndarray | None,
                 eps: float, post: bool = False) -> None:
        self.mode, self.kind, self.dtype, self.ws, self.post = mode, kind, dtype, ws, post
        self.to_bf16 = dtype == torch.bfloat16
        self.k = ws[0].shape[1]
        self.n_out = [w.shape[0] for w in ws] if mode == MODE_SPLIT else [ws[0].shape[0]]
        self.cols = self.n_out + ([self.n_out[0]] if post else [])
        self.do_norm = nw is not None and not post
        self.nw = nw if nw is not None else _F0[0]
        self.e32 = np.float32(eps)
        self.pw = self.wa = self.subs = self.kw = None
        if kind == "w8a8":
            self.pw = stage_w8a8(ws, mode)
            pk = self.pw.pk
            self.kw = ((pk.kp // 4, pk.data, pk.np_, pk.wsum128, pk.scale) if is_tiled(pk.layout)
                       else (pk.data, self.pw.zeros, pk.scale))
        elif kind == "mixed":
            self.subs = [Plan((w,), MODE_SPLIT, dtype, weight_kind((w,), ("w",), None), None, 0.0) for w in ws]
        elif kind == "float" and self.to_bf16 and USE_BF16_GEMV and all(w.dtype == torch.bfloat16 for w in ws):
            self.wa = [_bf16_view(w) for w in ws] + [_W0] * (3 - len(ws))

    def __call__(self, x: np.ndarray, res: np.ndarray | None = None) -> list[np.ndarray]:
        T = x.shape[0]
        if self.subs is not None:
            xn = _norm_rows(x, self.nw, self.e32, self.to_bf16) if self.do_norm else x
            return [sp(xn)[0] for sp in self.subs]
        outs = [np.empty((T, n), np.float32) for n in self.cols]
        if T == 0:
            return outs
        o = outs + [_F0] * (3 - len(outs))
        resa = _F0 if res is None else res
        tails = torch_tails(T * self.n_out[0]) if self.mode == MODE_SWIGLU else _NO_TAILS
        kw = self.kw
        if kw is not None:
            seg = self.pw.seg
            if len(kw) == 5:
                _stage_vnni(x, self.nw, self.e32, self.do_norm, self.post, self.to_bf16, kw[0],
                            _TPS[T] if T < 65 else padded_tokens(T), kw[1], kw[2], kw[3], kw[4], self.mode,
                            seg, tails, resa, o[0], o[1], o[2])
            else:
                _stage_plain(x, self.nw, self.e32, self.do_norm, self.post, self.to_bf16, kw[0], kw[1], kw[2],
                             self.mode, seg, tails, resa, o[0], o[1], o[2])
            return outs
        wa = self.wa
        if wa is not None and T <= BF16_GEMV_MAX_T:
            tp = 1 if T <= 1 else (2 if T <= 2 else 4)
            _stage_bf16(x, self.nw, self.e32, self.do_norm, self.post, tp, _BF_NR[tp], wa[0], wa[1], wa[2],
                        self.mode, tails, resa, o[0], o[1], o[2])
            return outs
        xn = _norm_rows(x, self.nw, self.e32, self.to_bf16) if self.do_norm else x
        if self.kind == "group":
            ys = group_linears(np.ascontiguousarray(xn), self.ws, self.dtype)
        else:
            ys = [_float_linear(xn, w, self.dtype) for w in self.ws]
        if self.mode == MODE_SPLIT:
            return ys
        _epi_float(self.mode, ys[0], ys[-1], tails, resa, self.to_bf16, self.nw, self.e32, self.post, o[0], o[1])
        return outs


def rows(x: Any, name: str, k: int) -> tuple[np.ndarray, tuple | None]:
    """``x [..., k]`` (CPU floating torch tensor) -> (C-contiguous float32 ``[T, k]`` numpy,
    leading shape, or None for a 2-D float32 contiguous tensor: the zero-copy fast path).
    Raises TypeError (not a floating CPU tensor) / ValueError (0-d, last dim != k), naming
    ``name``."""
    if type(x) is torch.Tensor:
        try:
            a = x.numpy()
        except (RuntimeError, TypeError):
            a = None
        if a is not None and a.ndim == 2 and a.dtype == np.float32 and a.shape[1] == k and a.flags.c_contiguous:
            return a, None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.device.type != "cpu":
        raise TypeError(f"{name}: expected a floating CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{name}: expected shape [..., {k}], got {tuple(x.shape)}")
    return x.detach().float().contiguous().numpy().reshape(-1, k), tuple(x.shape[:-1])


def same_rows(a: np.ndarray, la: tuple | None, b: np.ndarray, lb: tuple | None) -> bool:
    """Whether two :func:`rows` results have the same leading shape."""
    return (la if la is not None else a.shape[:1]) == (lb if lb is not None else b.shape[:1])


def wrap(o: np.ndarray, lead: tuple | None) -> torch.Tensor:
    """float32 numpy ``[T, n]`` -> torch tensor of shape ``[*lead, n]`` (zero-copy)."""
    t = torch.from_numpy(o)
    return t if lead is None else t.reshape(*lead, o.shape[1])


def _norm_rows(x: np.ndarray, w: np.ndarray, eps: np.float32, to_bf16: bool) -> np.ndarray:
    out = np.empty_like(x)
    if x.shape[0]:
        _norm_kernel(x, w, eps, to_bf16, out)
    return out
