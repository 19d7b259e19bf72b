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
    INT8 matrix and packed with :func:`common.gemm.pack_w8a8` (cached per weight tuple by
    object identity, references kept alive). Segments (q | k | v) start on 64-row chunk
    boundaries (zero rows in between); gate/up are interleaved per chunk as 32 gate rows
    then the same 32 up rows, so every 64-column output tile holds matching g and u. Each
    ``prange`` iteration computes one chunk with common's VNNI register tiles
    (``gemm._chunk_acc``) or, on the fallback path, exact int32 dot products
    (``gemm._dot_i8``) and runs the epilogue on it right away.
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
bitwise equal to ``reference.qwen3`` (SiLU: SLEEF ``expf`` = torch's vectorised path; torch's
scalar tail of fewer than 32 elements per thread chunk uses libm ``expf``, which could differ
by 1 fp32 ulp; never observed in the tests). The torch-GEMM path is bitwise too. The bf16
GEMV differs from oneDNN only in the fp32 summation order of exact bf16 products: outputs
within 1 bf16 ulp (2^-8 relative) plus ``2^-20·Σ|x||w|`` absolute (cancellation).

Determinism: every output element belongs to one ``prange`` iteration with a fixed order.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from ...reference.deepseek_v4.quant import QuantWeight
from ..common import jit
from ..common.bf16 import f32_to_bf16_bits, load_f32, torch_bf16_as_u16
from ..common.bf16 import round_f32 as rnd
from ..common.gemm import CHUNK_N, _chunk_acc, _dot_i8, _pack_q32, pack_w8a8, padded_tokens
from ..common.jit import njit_kernel
from ..common.norm_rope import sumsq_torch_order
from ..common.quant import quant_row_f32
from ..deepseek_v4.sparse_attn import _bf16_dot_tile, _sleef_expf

__all__ = ["MODE_SPLIT", "MODE_RES", "MODE_SWIGLU", "BF16_GEMV_MAX_T", "ProjW8A8", "clear_cache",
           "proj_w8a8", "check_dtype", "act2d", "vec_f32", "weight_kind", "run_stage"]

MODE_SPLIT, MODE_RES, MODE_SWIGLU = 0, 1, 2
_HALF = CHUNK_N // 2
_ONE = np.float32(1.0)
_GRAIN = 32768  # at::internal::GRAIN_SIZE
#: Largest token count for the Numba bf16 GEMV (above: torch/oneDNN, see docs of the bench).
BF16_GEMV_MAX_T = 8
USE_BF16_GEMV = jit.HAS_AVX512BF16 and not jit.FORCE_FALLBACK
#: Tests may set this to "vnni" / "nk" to force a W8A8 kernel family in-process.
FORCE_LAYOUT: str | None = None


# --------------------------------------------------------------------------- host checks
def check_dtype(dtype: Any) -> bool:
    """True for bf16 mode; raises ValueError unless ``dtype`` is float32 or bfloat16."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype == torch.bfloat16


def act2d(x: Any, name: str, k: int | None = None) -> tuple[np.ndarray, tuple]:
    """``x [..., K]`` (CPU floating torch tensor) -> (C-contiguous float32 ``[T, K]`` numpy,
    leading shape). Raises TypeError (not a floating CPU tensor) / ValueError (0-d, wrong K)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.device.type != "cpu":
        raise TypeError(f"{name}: expected a floating CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected shape [..., K], got a 0-d tensor")
    if k is not None and x.shape[-1] != k:
        raise ValueError(f"{name}: last dim is {x.shape[-1]}, expected {k}")
    lead = tuple(x.shape[:-1])
    a = x.detach().float().contiguous().numpy()
    return a.reshape(-1, x.shape[-1]), lead


def vec_f32(w: Any, name: str, n: int) -> np.ndarray:
    """A ``[n]`` float vector (norm weight) as float32 numpy (cached per tensor object)."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating torch.Tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if tuple(w.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(w.shape)}")
    return _cached((w,), "vec", lambda: w.detach().float().contiguous().numpy())


def weight_kind(ws: tuple, names: tuple, k: int | None) -> str:
    """"w8a8" (all QuantWeight), "float" (all 2-D float tensors) or "mixed"; checks that
    every weight's in-dim is ``k`` (the first weight's if None). Raises TypeError/ValueError
    naming the offending weight."""
    kinds = set()
    for w, nm in zip(ws, names):
        if isinstance(w, QuantWeight):
            kinds.add("w8a8")
        elif isinstance(w, torch.Tensor) and w.dtype.is_floating_point and w.dim() == 2:
            kinds.add("float")
        else:
            raise TypeError(f"{nm}: expected a QuantWeight or a 2-D float tensor [out, in], "
                            f"got {getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        k = w.shape[1] if k is None else k
        if w.shape[1] != k:
            raise ValueError(f"{nm}: in-dim is {w.shape[1]}, expected {k}")
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --------------------------------------------------------------------------- weight cache
_CACHE: dict[tuple, tuple[tuple, Any]] = {}
_LOCK = threading.Lock()


def _cached(objs: tuple, tag: str, build) -> Any:
    """Derived data of ``objs`` keyed by their ids; the entry holds ``objs`` (so an id
    cannot be reused while it lives) and is rebuilt if any object differs."""
    key = (tag,) + tuple(id(o) for o in objs)
    ent = _CACHE.get(key)
    if ent is not None and all(a is b for a, b in zip(ent[0], objs)):
        return ent[1]
    with _LOCK:
        ent = _CACHE.get(key)
        if ent is None or not all(a is b for a, b in zip(ent[0], objs)):
            ent = (objs, build())
            _CACHE[key] = ent
    return ent[1]


def clear_cache() -> None:
    """Drop every packed / converted weight (and the references keeping the sources alive)."""
    with _LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------- W8A8 packing
class ProjW8A8:
    """Concatenated, packed INT8 weight of one stage.

    ``pk``: :class:`common.gemm.PackedW8A8` of the ``[Np, K]`` concatenation; ``seg``: int64
    ``[6]`` = (start, rows) of up to 3 segments in the padded row space (SwiGLU: ``(0, I)``);
    ``n_out``: output widths; ``zeros``: int32 ``[Np]`` (zero-point term of the plain path)."""

    __slots__ = ("pk", "seg", "n_out", "k", "zeros")

    def __init__(self, pk, seg, n_out, k):
        self.pk, self.seg, self.n_out, self.k = pk, seg, n_out, k
        self.zeros = np.zeros(pk.np_ if pk.layout == "vnni" else pk.n, np.int32)


def _layout() -> str:
    return FORCE_LAYOUT or ("vnni" if jit.USE_VNNI else "nk")


def _build_w8a8(qws: tuple, mode: int, layout: str) -> ProjW8A8:
    K = qws[0].shape[1]
    q = [w.qweight.detach().contiguous().numpy() for w in qws]
    s = [w.scale.detach().float().contiguous().numpy() for w in qws]
    seg = np.zeros(6, np.int64)
    if mode == MODE_SWIGLU:
        I = q[0].shape[0]
        nc = -(-I // _HALF)
        wq = np.zeros((nc, CHUNK_N, K), np.int8)
        sc = np.zeros((nc, CHUNK_N), np.float32)
        nf = I // _HALF
        for j in range(2):  # 32 gate rows, then the same 32 up rows, per chunk
            lo = j * _HALF
            wq[:nf, lo:lo + _HALF] = q[j][:nf * _HALF].reshape(nf, _HALF, K)
            sc[:nf, lo:lo + _HALF] = s[j][:nf * _HALF].reshape(nf, _HALF)
            r = I - nf * _HALF
            if r:
                wq[nf, lo:lo + r] = q[j][nf * _HALF:]
                sc[nf, lo:lo + r] = s[j][nf * _HALF:]
        seg[1] = I
        wq, sc, n_out = wq.reshape(nc * CHUNK_N, K), sc.reshape(-1), (I,)
    elif len(q) == 1:
        wq, sc, n_out = q[0], s[0], (q[0].shape[0],)
        seg[1] = q[0].shape[0]
    else:
        pads = [-(-a.shape[0] // CHUNK_N) * CHUNK_N for a in q]
        wq = np.zeros((sum(pads), K), np.int8)
        sc = np.zeros(sum(pads), np.float32)
        off = 0
        for i, (a, b, p) in enumerate(zip(q, s, pads)):
            wq[off:off + a.shape[0]] = a
            sc[off:off + a.shape[0]] = b
            seg[2 * i], seg[2 * i + 1] = off, a.shape[0]
            off += p
        n_out = tuple(a.shape[0] for a in q)
    return ProjW8A8(pack_w8a8(wq, sc, layout), seg, n_out, K)


def proj_w8a8(qws: tuple, mode: int) -> ProjW8A8:
    """The cached :class:`ProjW8A8` of the QuantWeights ``qws`` (1-3 of them for split or
    residual stages, (gate, up) for SwiGLU) in the active kernel layout."""
    layout = _layout()
    return _cached(tuple(qws), f"w8a8/{mode}/{layout}", lambda: _build_w8a8(tuple(qws), mode, layout))


# --------------------------------------------------------------------------- scalar pieces
@njit_kernel
def _silu(g):
    """torch's fp32 ``silu``: ``x / (1 + exp(-x))`` with the SLEEF ``exp``."""
    return np.float32(g / np.float32(_ONE + _sleef_expf(-g)))


@njit_kernel
def _silu_libm(g):
    """torch's scalar ``silu`` (the tail of its vectorised loop): libm ``expf``."""
    return np.float32(g / np.float32(_ONE + np.float32(math.exp(-g))))


@njit_kernel
def _swiglu(g, u, to_bf16):
    """``rnd(rnd(silu(g))·u)`` for rounded g, u (reference ``gate_up_swiglu``)."""
    return rnd(np.float32(rnd(_silu(g), to_bf16) * u), to_bf16)


@njit_kernel
def _swiglu_libm(g, u, to_bf16):
    return rnd(np.float32(rnd(_silu_libm(g), to_bf16) * u), to_bf16)


@njit_kernel
def _in_tail(f, tails):
    """Whether flat element ``f`` of the SwiGLU output lies in one of torch's scalar tails."""
    for k in range(tails.shape[0]):
        if f >= tails[k, 0] and f < tails[k, 1]:
            return True
    return False


def torch_tails(numel: int) -> np.ndarray:
    """Flat ``[lo, hi)`` ranges (int64 ``[n, 2]``) where torch's fp32 ``silu`` on a contiguous
    tensor of ``numel`` elements runs its scalar op (libm ``expf``) instead of the SLEEF vector
    op: TensorIterator splits ``[0, numel)`` into ``at::parallel_for`` chunks (grain 32768,
    ``torch.get_num_threads()``), and each chunk's vectorised loop (blocks of 2 vectors: 32
    floats on AVX-512, 16 on AVX2) leaves its last ``len % block`` elements to the scalar op.
    Without a SLEEF build (other capabilities) every element is scalar."""
    cap = str(torch.backends.cpu.get_cpu_capability())
    blk = 32 if cap.startswith("AVX512") else (16 if cap == "AVX2" else 0)
    if blk == 0:
        return np.array([[0, numel]], np.int64)
    nt = torch.get_num_threads()
    if numel < _GRAIN or nt == 1:
        chunks = [(0, numel)]
    else:
        nt = min(nt, -(-numel // _GRAIN))
        ch = -(-numel // nt)
        chunks = [(c * ch, min(numel, (c + 1) * ch)) for c in range(nt) if c * ch < numel]
    return np.array([[lo + (hi - lo) // blk * blk, hi] for lo, hi in chunks], np.int64).reshape(-1, 2)


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


@njit_kernel
def _prologue_row(x, t, nw, eps, do_norm, to_bf16, q, sx):
    """Row t: (norm) + bit-exact INT8 quantisation into ``q[t, :K]`` and ``sx[t]``."""
    K = x.shape[1]
    buf = np.empty(K, np.float32)
    if do_norm:
        _norm_row(x[t], nw, eps, to_bf16, np.empty((4, 32), np.float32), buf)
    else:
        buf[:] = x[t]
    sx[t] = quant_row_f32(buf, q[t, :K])


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
                o[i] = _swiglu(g, u, to_bf16)
            base = t * seg[1] + j0
            for k in range(tails.shape[0]):
                for i in range(max(tails[k, 0], base) - base, min(tails[k, 1], base + m) - base):
                    g = rnd(_deq(a[i], wg[i], s, sg[i]), to_bf16)
                    u = rnd(_deq(b[i], wu[i], s, su[i]), to_bf16)
                    o[i] = _swiglu_libm(g, u, to_bf16)
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
    for t in prange(T):
        _prologue_row(x, t, nw, eps, do_norm, to_bf16, q, sx)
    xp = np.empty(KG * 4 * TP, np.uint8)
    _pack_q32(q.view(np.uint32), xp.view(np.uint32), T, TP)
    for c in prange(NP // CHUNK_N):
        acc = np.empty(TP * CHUNK_N, np.int32)
        _chunk_acc(c, xp, TP, KG, wp, acc)
        _epilogue(mode, acc, c * CHUNK_N, T, ws128, sw, sx, to_bf16, seg, tails, res, o0, o1, o2)
    if post:
        for t in prange(T):
            _norm_row(o0[t], nw, eps, to_bf16, np.empty((4, 32), np.float32), o1[t])


@njit_kernel(parallel=True)
def _stage_plain(x, nw, eps, do_norm, post, to_bf16, wq, zeros, sw, mode, seg, tails, res, o0, o1, o2):
    """Fallback: prologue + exact int32 dot products on the ``[N, K]`` weight, same epilogue."""
    T, K = x.shape
    q = np.zeros((T, K), np.int8)
    sx = np.empty(T, np.float32)
    for t in prange(T):
        _prologue_row(x, t, nw, eps, do_norm, to_bf16, q, sx)
    N = wq.shape[0]
    for c in prange((N + CHUNK_N - 1) // CHUNK_N):
        acc = np.zeros(T * CHUNK_N, np.int32)
        n0 = c * CHUNK_N
        for n in range(n0, min(N, n0 + CHUNK_N)):
            wr = wq[n]
            for t in range(T):
                acc[t * CHUNK_N + n - n0] = _dot_i8(q[t], wr)
        _epilogue(mode, acc, n0, T, zeros, sw, sx, to_bf16, seg, tails, res, o0, o1, o2)
    if post:
        for t in prange(T):
            _norm_row(o0[t], nw, eps, to_bf16, np.empty((4, 32), np.float32), o1[t])


# --------------------------------------------------------------------------- bf16 GEMV
#: vdpbf16ps row-dot tiles: token-tile height -> weight rows per tile (plus 1-row tiles for
#: the remainder rows of a weight).
_BF_NR = {1: 8, 2: 8, 4: 5}
_B18, _B28, _B45 = (_bf16_dot_tile(t, r) for t, r in _BF_NR.items())
_B11, _B21, _B41 = (_bf16_dot_tile(t, 1) for t in _BF_NR)


@njit_kernel
def _bf_dots(tp, full, xf, x_off, K, wf, w_off, nk, out):
    """``tp`` tokens x (``_BF_NR[tp]`` rows if ``full`` else 1 row) bf16 dot products."""
    if full:
        if tp == 1:
            _B18(xf, x_off, K, wf, w_off, K, nk, out, 0)
        elif tp == 2:
            _B28(xf, x_off, K, wf, w_off, K, nk, out, 0)
        else:
            _B45(xf, x_off, K, wf, w_off, K, nk, out, 0)
    elif tp == 1:
        _B11(xf, x_off, K, wf, w_off, K, nk, out, 0)
    elif tp == 2:
        _B21(xf, x_off, K, wf, w_off, K, nk, out, 0)
    else:
        _B41(xf, x_off, K, wf, w_off, K, nk, out, 0)


@njit_kernel
def _bf_block(w, r0, rows, nr, tp, t0, T, xb, xr, nk, sc):
    """``sc[t*nr + r] = Σ_k x[t0+t, k]·w[r0+r, k]`` (fp32) for ``r < rows``, ``t < tp``:
    vdpbf16ps tiles over the first ``32·nk`` k, the remaining k in fp32 (exact products)."""
    K = w.shape[1]
    wf = w.reshape(-1)
    xf = xb.reshape(-1)
    if rows == nr:
        _bf_dots(tp, True, xf, t0 * K, K, wf, r0 * K, nk, sc)
    else:
        one = np.empty(tp, np.float32)
        for r in range(rows):
            _bf_dots(tp, False, xf, t0 * K, K, wf, (r0 + r) * K, nk, one)
            for t in range(tp):
                sc[t * nr + r] = one[t]
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
                        if _in_tail(t * w0.shape[0] + r0 + r, tails):
                            y = _swiglu_libm(y, rnd(sc2[j + r], True), True)
                        else:
                            y = _swiglu(y, rnd(sc2[j + r], True), True)
                    elif mode == MODE_RES:
                        y = rnd(np.float32(res[t, r0 + r] + y), True)
                    dst[t, r0 + r] = y
    if post:
        for t in prange(T):
            _norm_row(o0[t], nw, eps, True, np.empty((4, 32), np.float32), o1[t])


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
                if _in_tail(t * N + c, tails):
                    o0[t, c] = _swiglu_libm(g, rnd(y1[t, c], to_bf16), to_bf16)
                else:
                    o0[t, c] = _swiglu(g, rnd(y1[t, c], to_bf16), to_bf16)
            else:
                o0[t, c] = rnd(np.float32(res[t, c] + g), to_bf16)
    if post:
        for t in prange(T):
            _norm_row(o0[t], nw, eps, to_bf16, np.empty((4, 32), np.float32), o1[t])


def _float_linear(x: np.ndarray, w: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """The reference ``linear`` for a float weight (torch GEMM, one rounding to ``dtype``)."""
    xt = torch.from_numpy(x)
    if dtype == torch.float32:
        y = F.linear(xt, w.detach().float())
    else:
        y = F.linear(xt.to(dtype), w.detach().to(dtype)).float()
    return y.contiguous().numpy()


def _bf16_view(w: torch.Tensor) -> np.ndarray:
    return _cached((w,), "u16", lambda: torch_bf16_as_u16(w.detach().contiguous()))


def _bf16_tile(T: int) -> tuple[int, int]:
    tp = 1 if T <= 1 else (2 if T <= 2 else 4)
    return tp, _BF_NR[tp]


_F0 = np.zeros((1, 1), np.float32)
_W0 = np.zeros((0, 32), np.uint16)
_NO_TAILS = np.zeros((0, 2), np.int64)


def run_stage(x: np.ndarray, ws: tuple, mode: int, dtype: torch.dtype, *, nw: np.ndarray | None = None,
              eps: float = 0.0, post: bool = False, res: np.ndarray | None = None,
              kind: str = "float") -> list[np.ndarray]:
    """Run one fused projection stage on float32 rows ``x [T, K]`` (host dispatcher).

    ``ws``: the stage's weights (split: 1-3; residual: 1; SwiGLU: (gate, up)), all of
    ``kind`` ("w8a8"/"float"; "mixed" runs each weight separately after the prologue).
    ``nw``: float32 ``[K]`` input-norm weight (``post=False``) or ``[N]`` post-norm weight
    (``post=True``, residual mode) or None; ``res``: residual ``[T, N]`` (residual mode).
    Returns the float32 outputs: one per weight (split), ``[out]`` or ``[h, rms_norm(h)]``."""
    to_bf16 = dtype == torch.bfloat16
    T = x.shape[0]
    do_norm = nw is not None and not post
    nwa = nw if nw is not None else _F0[0]
    e32 = np.float32(eps)
    resa = res if res is not None else _F0
    if kind == "mixed":
        xn = _norm_rows(x, nw, e32, to_bf16) if do_norm else x
        return [run_stage(xn, (w,), MODE_SPLIT, dtype, kind=weight_kind((w,), ("w",), None))[0] for w in ws]
    if kind == "w8a8":
        pw = proj_w8a8(ws, mode)
        n_out = list(pw.n_out)
    elif mode == MODE_SPLIT:
        n_out = [w.shape[0] for w in ws]
    else:
        n_out = [ws[0].shape[0]]
    if post:
        n_out.append(n_out[0])
    outs = [np.empty((T, n), np.float32) for n in n_out]
    o = outs + [_F0] * (3 - len(outs))
    if T == 0:
        return outs
    tails = torch_tails(T * n_out[0]) if mode == MODE_SWIGLU else _NO_TAILS
    if kind == "w8a8":
        pk = pw.pk
        if pk.layout == "vnni":
            _stage_vnni(x, nwa, e32, do_norm, post, to_bf16, pk.kp // 4, padded_tokens(T), pk.data, pk.np_,
                        pk.wsum128, pk.scale, mode, pw.seg, tails, resa, o[0], o[1], o[2])
        else:
            _stage_plain(x, nwa, e32, do_norm, post, to_bf16, pk.data, pw.zeros, pk.scale, mode, pw.seg,
                         tails, resa, o[0], o[1], o[2])
        return outs
    if (to_bf16 and USE_BF16_GEMV and T <= BF16_GEMV_MAX_T
            and all(w.dtype == torch.bfloat16 and w.device.type == "cpu" for w in ws)):
        wa = [_bf16_view(w) for w in ws]
        wa = wa + [_W0] * (3 - len(wa))
        tp, nr = _bf16_tile(T)
        _stage_bf16(x, nwa, e32, do_norm, post, tp, nr, wa[0], wa[1], wa[2], mode, tails, resa, o[0], o[1],
                    o[2])
        return outs
    xn = _norm_rows(x, nw, e32, to_bf16) if do_norm else x
    ys = [_float_linear(xn, w, dtype) for w in ws]
    if mode == MODE_SPLIT:
        return ys
    _epi_float(mode, ys[0], ys[-1], tails, resa, to_bf16, nwa, e32, post, o[0], o[1])
    return outs


@njit_kernel(parallel=True)
def _norm_kernel(x, w, eps, to_bf16, out):
    for t in prange(x.shape[0]):
        _norm_row(x[t], w, eps, to_bf16, np.empty((4, 32), np.float32), out[t])


def _norm_rows(x: np.ndarray, w: np.ndarray, eps: np.float32, to_bf16: bool) -> np.ndarray:
    out = np.empty_like(x)
    if x.shape[0]:
        _norm_kernel(x, w, eps, to_bf16, out)
    return out
