"""W8A8 INT8 GEMM for decode: per-token INT8 activations x per-channel INT8 weights.

Numerics (golden: ``llm_kernels/reference/deepseek_v4/quant.py::w8a8_linear`` /
``int8_matmul``)::

    acc[t, n] = Σ_k q_x[t, k] * q_w[n, k]                  exact int32
    y[t, n]   = fl(fl(float32(acc[t, n]) * s_x[t]) * s_w[n])

(torch evaluates ``acc.float() * s * w.scale`` left to right in float32, so this order is
reproduced and every output is bitwise equal to the golden given the same quantised
inputs.) No fastmath anywhere in this module's arithmetic on floats.

Two kernel families, both exact:

* **Register tiles** (``layout="vnni"`` or ``"avx2"``, the default from tier avx2 up: one
  tile kind per process, :data:`jit.INT8_TILE`, obtained through
  :func:`.x86_avx2.int8_bcast_tile`). Described here for VNNI: ``vpdpbusd``
  multiplies *unsigned* by signed bytes, so activations are stored as ``u8 = q + 128`` and
  the zero point is removed in the epilogue with the per-row weight sums precomputed at
  pack time: ``Σ (q+128)·w = acc + 128·Σ_k w[n, k]``.

  Layouts ("broadcast" form, as in fbgemm/TVM): weights pre-packed once
  (:mod:`.gemm_pack`) into ``[Np/16][Kp/4][16][4]`` int8 (one 64-byte zmm = 4 consecutive k of 16 output channels),
  activations packed per call into ``[Kp/4][TP][4]`` u8; ``Kp`` = K rounded up to 4 (zero
  weights), ``Np`` = N rounded up to 64 (zero rows), ``TP`` = T padded to a compiled tile
  height (:func:`padded_tokens`, q = 0 rows). A register tile holds ``TT x NB`` zmm
  accumulators (TT tokens x NB blocks of 16 channels): per k-group each weight vector
  feeds TT ``vpdpbusd`` and each 4-byte activation broadcast feeds NB, and results come
  out in output order (no horizontal reductions).

  Schedule: ``prange`` over 64-column chunks (static split, no reductions). For
  ``T <= 16`` one tile covers all tokens and the chunk's weights are streamed from DRAM
  exactly once ("row streaming"; NB = 4 for T <= 6, 2 for T <= 12, 1 for T <= 16, with a
  software prefetch 2-8 KiB ahead for T >= 3, see :func:`prefetch_for`). For ``T > 16``
  (prefill) the tokens are split into tiles of 16 over K-blocks of ``K_CHUNK`` so the
  chunk's weights are re-read from L2 by every token tile. Measured on this machine vs
  the lab's row-dot kernels on the plain ``[N, K]`` layout (``4x4`` register tiles with
  horizontal reductions): equal at T=1, 1.3-1.5x faster at T=4, ~2x at T=16.
  int32 accumulators cannot overflow while ``K <= 66_000`` (255·127·K < 2^31); larger K
  raises.

  The AVX2 tile (tier avx2: ``vpsignb``/``vpmaddubsw``/``vpmaddwd`` on ymm, see
  :mod:`.x86_avx2`) reads the same packed weights and activations through the same
  kernels (same tile heights; it splits each call into ymm-sized sub-tiles itself) and
  returns the exact ``Σ q·w``: its weights' ``wsum128`` is 0, so the epilogues are shared.
  It needs activations in [-127, 127]: the raw-int8 entry points reject -128 there.
* **Fallback** (``layout="nk"``): plain auto-vectorised Numba on the unpacked ``[N, K]``
  int8 weight, one output per inner loop, accumulator kept in int32 with explicit
  ``np.int32`` wraps (otherwise Numba promotes to int64 and LLVM emits slow ``vpmuldq``;
  with the wraps it emits ``vpmaddwd``). Exact for ``K <= 133_000``.

Determinism: each output element is computed by exactly one ``prange`` iteration (the
split is over output columns only) and integer accumulation is exact, so results are
bitwise identical across calls and thread counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from . import jit
from .bf16 import kernel_rows, load_f32
from .gemm_pack import (
    ACT_OFFSET,
    CHUNK_N,
    MAX_K_PLAIN,
    PackedW8A8,
    as_numpy,
    is_tiled,
    pack_w8a8,
    unpack_w8a8,
)
from .jit import njit_kernel, sized
from .quant import quant_row_f32, quant_rows
from .x86 import VNNI_NB
from .x86_avx2 import int8_bcast_tile

__all__ = [
    "CHUNK_N",
    "K_CHUNK",
    "MAX_TILE_T",
    "TILE_HEIGHTS",
    "PackedW8A8",
    "W8A8Linear",
    "chunk_acc",
    "dot_i8",
    "nb_for",
    "prefetch_for",
    "pack_q32",
    "pack_w8a8",
    "pad_to_tile",
    "padded_tokens",
    "unpack_w8a8",
    "w8a8_linear",
    "w8a8_rows_f32",
    "PADDED_T",
    "DUMMY_I32",
    "w8a8_gemm",
    "w8a8_gemm_fallback",
    "w8a8_gemm_i32",
    "w8a8_gemm_i32_fallback",
    "w8a8_gemm_i32_vnni",
    "w8a8_gemm_vnni",
]

#: Largest token tile: TT x NB register tiles with NB = 4 (TT <= 6), 2 (TT <= 12) or
#: 1 (TT <= 16) blocks of 16 channels, i.e. at most 24 zmm accumulators.
MAX_TILE_T = 16
#: K elements per cache block when T > MAX_TILE_T (weights of one chunk and K-block:
#: 64*K_CHUNK bytes, L2-resident while every token tile passes over them).
K_CHUNK = 1024
_KG_CHUNK = K_CHUNK // 4


def nb_for(tt: int) -> int:
    """Weight blocks (of 16 channels) per register tile with ``tt`` tokens."""
    return 4 if tt <= 6 else (2 if tt <= 12 else 1)


def prefetch_for(tt: int) -> int:
    """Software-prefetch distance (bytes ahead in each weight stream) per tile height.

    Measured on the 2-core Zen 5 guest with weights streaming from DRAM (see
    ``benchmarks/bench_gemm.py``): the hardware prefetcher alone keeps up while the tile
    does little work per weight byte (T <= 6: within +-5 %), but not when it does a lot:
    T=8 +30 % with 4 KiB, T=16 +50-80 % with 8 KiB (1.1 -> 1.65-2.0 TOP/s). The AVX2 tile
    at T=2 walks one 16-channel stream at a time (its ymm budget holds 2 halves x 2 tokens,
    :func:`.x86_avx2.avx2_plan`), which the hardware prefetcher alone does not keep fed:
    2 KiB there (Zen 3, tier avx2, K=4096 N=14336 from DRAM, alternating processes: T=2
    2.06-2.26 -> 1.72-1.78 ms, T=1 1.72-1.79 ms)."""
    if tt == 2 and jit.INT8_TILE == "avx2":
        return 2048
    return 0 if tt <= 2 else (2048 if tt <= 6 else (4096 if tt <= 12 else 8192))


#: Compiled register-tile heights. Other token counts are padded up to the next height
#: with q = 0 rows (at most 3 wasted rows; T <= 16 is memory-bound, so padding is free
#: while it keeps the weights streaming in a single pass). Fewer variants = faster cold
#: compiles of the one core kernel.
TILE_HEIGHTS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
(_T1, _T2, _T3, _T4, _T5, _T6, _T8, _T12, _T16) = [
    int8_bcast_tile(tt, nb_for(tt), prefetch_for(tt)) for tt in TILE_HEIGHTS]


def pad_to_tile(T: int, heights: tuple) -> int:
    """Rows of a packed activation buffer for ``T`` tokens with register tiles of the
    given ``heights`` (ascending, the last one the full tile): whole full tiles plus one
    remainder tile padded up to the next height."""
    full = heights[-1]
    n, r = divmod(int(T), full)
    if r == 0:
        return int(T)
    return n * full + next(h for h in heights if h >= r)


def padded_tokens(T: int) -> int:
    """Rows of the packed activation buffer of the GEMM for ``T`` tokens: tiles of 16 plus
    one remainder tile padded up to the next entry of :data:`TILE_HEIGHTS` (decode-sized
    ``T`` read from :data:`PADDED_T`)."""
    return int(PADDED_T[T]) if 0 <= T < PADDED_T.size else pad_to_tile(T, TILE_HEIGHTS)


#: :func:`padded_tokens` of T = 0 … 63 (also read inside the Numba stage programs)
PADDED_T = np.array([pad_to_tile(t, TILE_HEIGHTS) for t in range(64)], np.int64)


# --------------------------------------------------------------------------- register-tile kernels (VNNI / AVX2)
@njit_kernel
def vnni_tile(tt, xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum):
    """One ``tt x 64`` output tile (``tt`` in TILE_HEIGHTS) = ``4/NB`` register-tile passes."""
    if tt == 1:
        _T1(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 2:
        _T2(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 3:
        _T3(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 4:
        _T4(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 5:
        _T5(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 6:
        _T6(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)
    elif tt == 8:
        for j in range(2):
            _T8(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, nkg, acc, a_off + j * 32, ats,
                  accum)
    elif tt == 12:
        for j in range(2):
            _T12(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, nkg, acc, a_off + j * 32, ats,
                  accum)
    else:
        for j in range(4):
            _T16(xp, x_off, xks, wp, w_off + j * 1 * wbs, wbs, nkg, acc, a_off + j * 16, ats,
                  accum)


@njit_kernel
def chunk_acc(c, xp, T, KG, wp, acc):
    """u8*s8 int32 accumulators (no zero-point correction) of output columns
    [64c, 64c+64) for all T (padded) tokens into the chunk-local ``acc[t*64 + j]``."""
    wbs = KG * 64
    xks = T * 4
    w_off = c * VNNI_NB * wbs
    if T <= MAX_TILE_T:  # T is a tile height: one pass streams the weights once
        vnni_tile(T, xp, 0, xks, wp, w_off, wbs, KG, acc, 0, CHUNK_N, False)
        return
    # several token tiles: K-blocked so the chunk's weights are re-read from L1/L2
    for kc in range(0, KG, _KG_CHUNK):
        nk = min(_KG_CHUNK, KG - kc)
        t0 = 0
        while t0 < T:
            tt = min(MAX_TILE_T, T - t0)
            vnni_tile(tt, xp, kc * xks + t0 * 4, xks, wp, w_off + kc * 64, wbs, nk, acc,
                  t0 * CHUNK_N, CHUNK_N, kc > 0)
            t0 += tt


@njit_kernel
def _epilogue_f32(acc, wsum128, sx, sw, out, T, n0, n1):
    """out[t, n] = fl(fl(f32(acc - 128*wsum) * sx[t]) * sw[n]) for n in [n0, n1), from the
    chunk-local ``acc`` [TP, 64]. Written over slices (not ``range(n0, min(..))``) so that
    LLVM vectorises it: a scalar epilogue between streaming tiles cost ~15 % at T=16."""
    ws = wsum128[n0:n1]
    s_w = sw[n0:n1]
    m = n1 - n0
    for t in range(T):
        a = acc[t * CHUNK_N:t * CHUNK_N + m]
        o = out[t, n0:n1]
        s = sx[t]
        for i in range(m):
            o[i] = np.float32(np.float32(np.float32(np.int32(a[i] - ws[i])) * s) * s_w[i])


@njit_kernel
def _epilogue_i32(acc, wsum128, out, T, n0, n1):
    ws = wsum128[n0:n1]
    m = n1 - n0
    for t in range(T):
        a = acc[t * CHUNK_N:t * CHUNK_N + m]
        o = out[t, n0:n1]
        for i in range(m):
            o[i] = np.int32(a[i] - ws[i])


@njit_kernel(parallel=True)
def _vnni_core(xp, T, TP, KG, wp, NP, N, wsum128, sx, sw, want_f32, out_i32, out_f32):
    """The one register-tile GEMM kernel (VNNI or AVX2 tiles, the process's
    :data:`jit.INT8_TILE`; a single compiled signature serves every entry point).

    ``xp``: packed activations ``[KG][TP][4]`` u8 (``TP = padded_tokens(T)``); ``wp``:
    packed weights; writes either the exact int32 result into ``out_i32`` [T, N] or the
    dequantised float32 into ``out_f32`` [T, N] (``want_f32``). Each 64-column chunk is
    one prange iteration: register tiles into a chunk-local int32 buffer (L1), then the
    epilogue of that chunk."""
    for c in prange(NP // CHUNK_N):
        acc = np.empty(TP * CHUNK_N, np.int32)
        chunk_acc(c, xp, TP, KG, wp, acc)
        n0 = c * CHUNK_N
        n1 = min(N, n0 + CHUNK_N)
        if want_f32:
            _epilogue_f32(acc, wsum128, sx, sw, out_f32, T, n0, n1)
        else:
            _epilogue_i32(acc, wsum128, out_i32, T, n0, n1)


#: Each packed activation word XOR this: ``q + 128`` per byte for the VNNI tile (``q + 128``
#: of a two's-complement byte is ``q ^ 0x80``), the signed ``q`` itself for the AVX2 tile
#: (:data:`.gemm_pack.ACT_OFFSET`).
_ACT_XOR32 = np.uint32(0x80808080 if ACT_OFFSET else 0)


@njit_kernel
def pack_q32(q32, xp32, T, TP):
    """Serial pack of row-major padded int8 rows (viewed as uint32 ``[T, KG]``, one word =
    4 consecutive k) into the ``[KG][TP][4]`` layout of this process's INT8 tile: u8
    ``q + 128`` (VNNI) or the signed ``q`` (AVX2; :data:`.gemm_pack.ACT_OFFSET`); padding
    rows T..TP-1 get q = 0.

    Serial and in output order on purpose: the layout interleaves all tokens in every
    64-byte line, so a row-parallel scatter makes both cores write every line (false
    sharing), which measured +40 us per call at T=16 (quantise + pack + GEMM)."""
    KG = q32.shape[1]
    for t in range(T):  # contiguous reads, strided writes: 2x faster than the other order
        row = q32[t]
        for kg in range(KG):
            xp32[kg * TP + t] = row[kg] ^ _ACT_XOR32
    for kg in range(KG):
        for t in range(T, TP):
            xp32[kg * TP + t] = _ACT_XOR32


@njit_kernel(parallel=True)
def _pack_x_i8(xq, xp, TP, KG):
    T, K = xq.shape
    q = np.zeros((T, KG * 4), np.int8)
    for t in prange(T):
        q[t, :K] = xq[t]
    pack_q32(q.view(np.uint32), xp.view(np.uint32), T, TP)


@njit_kernel(parallel=True)
def _quant_pack_x(x, xp, sx, TP, KG):
    """Per-row quantisation (bit-exact golden) of float32/bf16 ``x`` [T, K] (rows in
    parallel, each into its own contiguous zero-padded int8 row), then the serial pack
    into the ``[KG][TP][4]`` u8 activation layout; scales into ``sx`` [T]."""
    T, K = x.shape
    q = np.zeros((T, KG * 4), np.int8)
    for t in prange(T):
        buf = np.empty(K, np.float32)
        xr = x[t]
        for k in range(K):
            buf[k] = load_f32(xr[k])
        sx[t] = quant_row_f32(buf, q[t, :K])
    pack_q32(q.view(np.uint32), xp.view(np.uint32), T, TP)


_DUMMY_I32 = np.zeros((1, 1), np.int32)
_DUMMY_F32 = np.zeros((1, 1), np.float32)
DUMMY_I32 = _DUMMY_I32  # the unused int32 output of the float-output entry points


@njit_kernel
def w8a8_rows_f32(a2, xp, sx, TP, KG, wp, NP, N, wsum128, sw, dummy_i32, out):
    """:func:`_quant_pack_x` then :func:`_vnni_core` (float32 out) in one dispatch: the
    same two kernels, one Python -> Numba call fewer per :func:`w8a8_linear`. ``a2`` [T, K]
    float32 (or bf16 bits) rows, ``xp`` / ``sx`` scratch of ``kp · TP`` bytes and T scales
    (``TP = padded_tokens(T)``, ``KG = kp / 4``), the packed weight's fields, ``out``
    [T, N] float32. Callable from other Numba code (a fused stage's program)."""
    _quant_pack_x(a2, xp, sx, TP, KG)
    _vnni_core(xp, a2.shape[0], TP, KG, wp, NP, N, wsum128, sx, sw, True, dummy_i32, out)


# --------------------------------------------------------------------------- fallback kernels
@njit_kernel
def dot_i8(a, b):
    """Exact int32 dot product of two int8 vectors (the ``np.int32`` wraps keep LLVM on
    ``vpmaddwd``; without them Numba promotes to int64)."""
    s = np.int32(0)
    for k in range(a.size):
        s = np.int32(s + np.int32(a[k]) * np.int32(b[k]))
    return s


@njit_kernel(parallel=True)
def _plain_core(xq, sx, wq, sw, want_f32, out_i32, out_f32):
    """The one fallback kernel: prange over output channels n (weight row in L1, reused
    by every token); exact int32 dot products; optional float32 dequant."""
    T = xq.shape[0]
    for n in prange(wq.shape[0]):
        wr = wq[n]
        s_w = sw[n]
        for t in range(T):
            acc = dot_i8(xq[t], wr)
            if want_f32:
                out_f32[t, n] = np.float32(np.float32(np.float32(acc) * sx[t]) * s_w)
            else:
                out_i32[t, n] = acc


# --------------------------------------------------------------------------- public API
def _check_x(xq: Any, sx: Any | None, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    x = as_numpy(xq, "xq")
    if x.dtype != np.int8 or x.ndim != 2:
        raise TypeError(f"xq must be 2-D int8 [T, K], got {x.dtype} {x.shape}")
    if x.shape[1] != k:
        raise ValueError(f"xq has K={x.shape[1]}, weight has K={k}")
    x = np.ascontiguousarray(x)
    if sx is None:
        return x, None
    s = as_numpy(sx, "sx")
    if s.dtype != np.float32 or s.size != x.shape[0] or s.ndim not in (1, 2):
        raise ValueError(f"sx must be float32 [T] or [T, 1] with T={x.shape[0]}, got {s.dtype} {s.shape}")
    return x, np.ascontiguousarray(s.reshape(-1))


def _require_tiled(w: PackedW8A8) -> None:
    if not is_tiled(w.layout) or w.layout != jit.INT8_TILE:
        raise ValueError(f"weight layout is {w.layout!r}, this process's register-tile kernel needs "
                         f"{jit.INT8_TILE!r} (tier {jit.TIER})")


def _check_x_tiled(xq: Any, sx: Any | None, w: PackedW8A8) -> tuple[np.ndarray, np.ndarray | None]:
    x, s = _check_x(xq, sx, w.k)
    if w.layout == "avx2" and x.size and int(x.min()) == -128:
        raise ValueError("the AVX2 INT8 tile needs activations in [-127, 127] (the quantiser's range); "
                         "xq holds -128")
    return x, s


def w8a8_gemm_i32_vnni(xq: Any, w: PackedW8A8) -> np.ndarray:
    """Exact int32 ``xq @ q_wᵀ`` with the register-tile kernel (VNNI or AVX2, the process's
    :data:`jit.INT8_TILE`).

    Args: ``xq`` int8 ``[T, K]`` (in [-127, 127] for ``"avx2"``); ``w`` packed with the
    process's tile layout (``"vnni"``/``"avx2"``).
    Returns: int32 ``[T, N]``, equal to the golden ``int8_matmul``.
    Raises: TypeError/ValueError on dtype/shape/layout mismatch or an ``"avx2"`` -128."""
    _require_tiled(w)
    x, _ = _check_x_tiled(xq, None, w)
    T = x.shape[0]
    out = np.empty((T, w.n), np.int32)
    if T and w.n:
        TP = padded_tokens(T)
        xp = np.empty(w.kp * TP, np.uint8)
        _pack_x_i8(x, xp, TP, w.kp // 4)
        _vnni_core(xp, T, TP, w.kp // 4, w.data, w.np_, w.n, w.wsum128, _DUMMY_F32[0],
                   w.scale, False, out, _DUMMY_F32)
    return out


def w8a8_gemm_vnni(xq: Any, sx: Any, w: PackedW8A8) -> np.ndarray:
    """``y = fl(fl(acc * sx[t]) * s_w[n])`` with the register-tile kernel (see module docstring).

    Args: ``xq`` int8 ``[T, K]`` (in [-127, 127] for ``"avx2"``), ``sx`` float32 ``[T]`` (or
    ``[T, 1]``), ``w`` packed with the process's tile layout (``"vnni"``/``"avx2"``).
    Returns float32 ``[T, N]``, bitwise equal to the golden ``w8a8_linear`` for the same
    quantised inputs. Raises TypeError/ValueError."""
    _require_tiled(w)
    x, s = _check_x_tiled(xq, sx, w)
    T = x.shape[0]
    out = np.empty((T, w.n), np.float32)
    if T and w.n:
        TP = padded_tokens(T)
        xp = np.empty(w.kp * TP, np.uint8)
        _pack_x_i8(x, xp, TP, w.kp // 4)
        _vnni_core(xp, T, TP, w.kp // 4, w.data, w.np_, w.n, w.wsum128, s, w.scale, True,
                   _DUMMY_I32, out)
    return out


def _plain_weight(qweight: Any, scale: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(qweight, PackedW8A8):
        if qweight.layout != "nk":
            raise ValueError("the fallback kernel needs an unpacked [N, K] weight (layout='nk')")
        return qweight.data, qweight.scale
    w = as_numpy(qweight, "qweight")
    if w.dtype != np.int8 or w.ndim != 2:
        raise TypeError(f"qweight must be 2-D int8 [N, K], got {w.dtype} {w.shape}")
    if w.shape[1] > MAX_K_PLAIN:
        raise ValueError(f"K={w.shape[1]} too large for exact int32 accumulation")
    s = None
    if scale is not None:
        s = as_numpy(scale, "scale")
        if s.shape != (w.shape[0],) or s.dtype != np.float32:
            raise ValueError(f"scale must be float32 [N={w.shape[0]}], got {s.dtype} {s.shape}")
        s = np.ascontiguousarray(s)
    return np.ascontiguousarray(w), s


def w8a8_gemm_i32_fallback(xq: Any, qweight: Any) -> np.ndarray:
    """Exact int32 ``xq @ qweightᵀ`` with the plain (non-intrinsic) kernel.

    Args: ``xq`` int8 ``[T, K]``; ``qweight`` int8 ``[N, K]`` or a ``layout="nk"``
    :class:`PackedW8A8`. Returns int32 ``[T, N]``. Raises TypeError/ValueError."""
    w, _ = _plain_weight(qweight)
    x, _ = _check_x(xq, None, w.shape[1])
    out = np.empty((x.shape[0], w.shape[0]), np.int32)
    if out.size:
        _plain_core(x, _DUMMY_F32[0], w, _DUMMY_F32[0], False, out, _DUMMY_F32)
    return out


def w8a8_gemm_fallback(xq: Any, sx: Any, qweight: Any, scale: Any | None = None) -> np.ndarray:
    """W8A8 GEMM + dequant with the plain kernel; same contract as :func:`w8a8_gemm_vnni`.

    Args: ``xq`` int8 ``[T, K]``, ``sx`` float32 ``[T]``/``[T, 1]``; ``qweight`` int8
    ``[N, K]`` with ``scale`` float32 ``[N]``, or a ``layout="nk"`` :class:`PackedW8A8`
    (then ``scale`` is ignored). Returns float32 ``[T, N]``. Raises TypeError/ValueError."""
    w, s_w = _plain_weight(qweight, scale)
    if s_w is None:
        raise ValueError("scale is required with a raw int8 weight")
    x, s = _check_x(xq, sx, w.shape[1])
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if out.size:
        _plain_core(x, s, w, s_w, True, _DUMMY_I32, out)
    return out


def w8a8_gemm_i32(xq: Any, w: PackedW8A8) -> np.ndarray:
    """Exact int32 accumulators ``[T, N]`` with the kernel matching ``w.layout``."""
    if is_tiled(w.layout):
        return w8a8_gemm_i32_vnni(xq, w)
    return w8a8_gemm_i32_fallback(xq, w)


def w8a8_gemm(xq: Any, sx: Any, w: PackedW8A8) -> np.ndarray:
    """W8A8 GEMM + dequant ``[T, N]`` float32 with the kernel matching ``w.layout``
    (quantised activations in: ``xq`` int8 ``[T, K]``, ``sx`` float32 ``[T]``)."""
    if is_tiled(w.layout):
        return w8a8_gemm_vnni(xq, sx, w)
    return w8a8_gemm_fallback(xq, sx, w)


class W8A8Linear:
    """A W8A8 linear layer ``y = x @ Wᵀ`` holding a pre-packed INT8 weight.

    ``__call__(x)`` fuses per-token quantisation (bit-exact ``quant_per_row``), packing,
    the INT8 GEMM and the dequant epilogue in one Numba call; the result is bitwise equal
    to the golden ``w8a8_linear(x, QuantWeight(qweight, scale))``.

    Args:
        qweight: int8 ``[N, K]``; scale: float32 ``[N]``.
        layout: ``"vnni"``/``"avx2"`` (the process's tile), ``"nk"`` or ``None`` (active
            dispatch path).
    """

    def __init__(self, qweight: Any, scale: Any, layout: str | None = None) -> None:
        self.packed = pack_w8a8(qweight, scale, layout)

    @classmethod
    def from_quant_weight(cls, qw: Any, layout: str | None = None) -> W8A8Linear:
        """From the golden's ``QuantWeight`` (``.qweight`` int8, ``.scale`` float32)."""
        return cls(qw.qweight, qw.scale, layout)

    @classmethod
    def from_float(cls, w: Any, layout: str | None = None) -> W8A8Linear:
        """Quantise a float weight ``[N, K]`` per output channel with the golden recipe
        (``reference.deepseek_v4.quant.quantize_weight``) and pack it."""
        from ...numerics.quant import quantize_weight

        return cls.from_quant_weight(quantize_weight(w), layout)

    @property
    def in_features(self) -> int:
        return self.packed.k

    @property
    def out_features(self) -> int:
        return self.packed.n

    @property
    def layout(self) -> str:
        return self.packed.layout

    def __repr__(self) -> str:
        return f"W8A8Linear(in={self.packed.k}, out={self.packed.n}, layout={self.packed.layout!r})"

    def __call__(self, x: Any) -> Any:
        """``x`` ``[..., K]`` float32 or bfloat16 (torch CPU tensor, numpy float32, or numpy
        uint16 bf16 bits) -> float32 ``[..., N]`` (a torch tensor for torch input, else
        numpy). Raises TypeError/ValueError on a bad dtype or K."""
        return w8a8_linear(x, self.packed)


def w8a8_linear(x: Any, w: PackedW8A8) -> Any:
    """``y = x @ Wᵀ`` for a packed weight: per-token quantisation (bit-exact
    ``quant_per_row``), packing, the INT8 GEMM and the dequant epilogue in one Numba call
    (what :class:`W8A8Linear` runs). ``x`` ``[..., K]`` float32 or bfloat16 (torch CPU
    tensor, numpy float32, or numpy uint16 bf16 bits) -> float32 ``[..., N]`` (a torch
    tensor for torch input, else numpy). Raises TypeError/ValueError on a bad dtype or K."""
    a2, lead = kernel_rows(x, w.k)
    out = np.empty((a2.shape[0], w.n), np.float32)
    if out.size:
        if is_tiled(w.layout):
            _require_tiled(w)
            T = a2.shape[0]
            TP = padded_tokens(T)
            sized(w8a8_rows_f32, T * w.k * w.n)(a2, np.empty(w.kp * TP, np.uint8), np.empty(T, np.float32), TP,
                                                w.kp // 4, w.data, w.np_, w.n, w.wsum128, w.scale, _DUMMY_I32, out)
        else:
            xq, sx = quant_rows(a2)
            sized(_plain_core, xq.size * w.n)(xq, sx, w.data, w.scale, True, _DUMMY_I32, out)
    out = out.reshape(*lead, w.n)
    if not isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(out)
    return out
