"""W4A8 GEMM on MXFP4 weights kept 4-bit: E2M1 codes (4 bits per weight) and one UE8M0
scale byte per 32 weights, against INT8 activations quantised per block of 32 (the
``int8_g32`` activations).

Golden: :func:`llm_kernels.numerics.mxfp4.mxfp4_linear` (``w2`` = twice the E2M1 value, an
int8 in {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}; ``s_w = 2^(byte - 128)``)::

    isum[t, n, g] = Σ_{k in block g} q_x[t, k] · w2[n, k]                   exact int32
    y[t, n] = 0;  for g in blocks:  y = fl(y + fl(fl(f32(isum) · s_x[t, g]) · s_w[n, g]))

Every output is bitwise equal to it (the activations quantised by the grouped INT8 GEMM's
bit-exact quantiser, :mod:`.gemm_group`; exact block sums; the same float32 operations in
the same order; no fastmath, no FMA contraction).

**Tiled layout** (``"w4"``, tier avx2 and up; one layout for both tiles), made once at load
by :func:`pack_mxfp4`: nibble blocks ``[Np/16][K/8][64]`` (byte ``4l + b`` of block ``p`` of
16-channel block ``j``: code of ``W[16j + l, 8p + b]`` low, of ``W[16j + l, 8p + 4 + b]``
high), i.e. the broadcast layout of :mod:`.gemm` with two k-groups per byte: exactly
``K/2`` bytes per row, as stored. Scale bytes chunk-major ``[Np/64][K/32][64]`` (one
sequential stream per 64-column chunk next to its weights). ``Np`` = N rounded up to 64
(code 0 rows: weight 0).

**Register tiles** (:mod:`.x86_w4a8`): each 64-byte load is two int8 weight vectors after a
``vpshufb`` table decode of its low and high nibbles into ``w2 + 12`` (unsigned), so that the
raw signed activations are the broadcast operand and the zero point is the per-token,
per-block ``corr = -12·Σ q`` made when the activations are quantised (the VNNI chains start
from it):

* VNNI (``jit.INT8_TILE == "vnni"``): ``vpshufb`` zmm + ``vpdpbusd``;
* AVX2 (``"avx2"``): ``vpshufb`` ymm + ``vpmaddubsw`` (pair sums ``<= 2·24·127``: the
  int16 sums of four pairs are exact) + one ``vpmaddwd`` per two nibble blocks.

Block sums stay in registers and are folded into float32 register accumulators after every
block of 32 inputs (``fl(fl(f32(isum + corr)·s_x)·s_w)``, the scale byte turned into its
exact float32 in the tile).

Schedule as :mod:`.gemm_group`: ``prange`` over 64-column chunks; ``T <= 16`` one token
tile (padded to a tile height), the chunk's weights streamed once; ``T > 16`` K-blocks of
1024 inputs re-read from L2 by each tile of 16 tokens. **Fallback** (tier plain, layout
``"nk"``: the :class:`~llm_kernels.numerics.mxfp4.MXFP4Weight`'s own ``[N, K/2]`` codes and
``[N, K/32]`` bytes, no copy): per row a table decode into int8, exact int32 block dots
(:func:`.gemm.dot_i8`) and the same fold.

Determinism: each output belongs to one ``prange`` iteration, blocks are folded in order,
so results are bitwise identical across calls and thread counts.

Streaming (VNNI): each sub-tile software-prefetches its nibble streams 2 KiB (T=1, into L2)
/ 4 KiB ahead and the scale stream a quarter of that, and the T=1 sub-tile walks all 4 streams
of its chunk interleaved (:func:`.x86_w4a8.w4_prefetch`, :func:`.x86_w4a8.w4_units`). One Flash
expert from DRAM, 2 threads, tier avx512-vnni-bf16 (2026-12-04, same-run BW 42.0 GB/s, Zen 5):
T=1 0.552 ms (61 % of BW, 1.47x faster than per-row INT8), T=4 0.501 ms, T=8 0.537 ms
(1.45x faster than per-row INT8); before the prefetch 0.677 / 0.697 / 1.139 ms (BW 42.8).
Zen 4 (T=1: ``prefetcht1`` of one line per stream and block, one chain per unit; ``vscalefps``
fold; serial quantisation for T <= 2): T=1 0.573 -> 0.467 ms (65 -> 79 % of a ~36 GB/s
probe), 0.501 -> 0.380 ms (44 -> 55 % of a ~62 GB/s probe); T=4 / T=8 unchanged.
AVX2 (Zen 3): the one-token sub-tile covers two 16-channel streams with a 1 KiB
``prefetcht1``: T=1 0.66 -> 0.50 ms per Flash expert from DRAM.

**Several weights in one region** (:class:`MXFP4Stack`, :func:`quant_pack_w4_parts`,
:func:`w4_parts_core`): the MoE's decode path runs every routed expert of a step as one
``prange`` over (expert, 64-column chunk) with the same tiles, so the ~43 µs fixed cost of a
call (two parallel regions) is paid once per weight kind and step, not per expert.

Measured: ``docs/performance.md`` ("MXFP4 experts, W4A8"); ``benchmarks/bench_w4a8.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import prange

from ...numerics.mxfp4 import E2M1_X2, MXFP4_BLOCK, MXFP4Weight
from . import jit
from .bf16 import kernel_rows, f32_from_bits
from .gemm import K_CHUNK, MAX_TILE_T, TILE_HEIGHTS, dot_i8, padded_tokens
from .gemm_group import pack_words, quant_group_row, quant_groups_rows, quant_pack_groups
from .gemm_pack import CHUNK_N, aligned_empty
from .jit import njit_kernel
from .x86_w4a8 import TS_MAX, UNIT, ZP, tile_isa, w4_plan, w4_tile, w4_units

__all__ = ["MXFP4Stack", "PackedMXFP4", "e8m0_to_f32", "mxfp4_gemm_linear", "pack_mxfp4", "quant_pack_w4_parts",
           "stack_mxfp4", "unpack_mxfp4", "w4_parts_core"]

_LUT = np.array(E2M1_X2, np.int8)

#: Sub-tile intrinsics of this process's ISA (:func:`.x86_w4a8.w4_tile`), by token count; an
#: AVX2 process calls those of at most 8 tokens (``TS_MAX["avx2"] == 8``; the 12-token
#: branch is constant-false there).
_SUB_T = (1, 2, 3, 4, 5, 6, 8, 12)
(_S1, _S2, _S3, _S4, _S5, _S6, _S8, _S12) = [w4_tile(ts) for ts in _SUB_T]
_ISA = tile_isa()
_TSMAX = TS_MAX[_ISA]
_W = UNIT[_ISA]                  # channels per register unit
_VB = 4 * _W                     # weight bytes per unit and nibble block
_UPB = 64 // _VB                 # units per 16-channel weight block
_NU = CHUNK_N // _W              # units per 64-column chunk
_US = np.array([w4_units(_ISA, ts) for ts in range(_TSMAX + 1)], np.int64)
for _tt in TILE_HEIGHTS:  # every height runs as equal sub-tiles of the shapes above
    _plan = w4_plan(_ISA, _tt)
    assert all(ts in _SUB_T and us == _plan[0][3] == w4_units(_ISA, ts) for _, ts, _, us in _plan), _plan


@njit_kernel
def e8m0_to_f32(e):
    """UE8M0 byte ``e`` (uint8, 0..254) -> the exact float32 ``2^(e - 128)`` (the scale of
    the doubled E2M1 integers; ``e <= 1`` give float32 subnormals). Numba-callable."""
    u = np.uint32(e)
    if u >= np.uint32(2):
        return f32_from_bits((u - np.uint32(1)) << np.uint32(23))
    return f32_from_bits(np.uint32(0x200000) << u)


class PackedMXFP4:
    """An :class:`~llm_kernels.numerics.mxfp4.MXFP4Weight` in the form the W4A8 kernels
    read (built once at load by :func:`pack_mxfp4`).

    Attributes: ``n``, ``k``, ``layout`` (``"w4"`` or ``"nk"``), ``data`` (uint8: the nibble
    blocks ``[Np/16 · K/8 · 64]`` for ``"w4"``, the ``[N, K/2]`` codes for ``"nk"``), ``sw8``
    (uint8 UE8M0 bytes: ``[Np/64, K/32, 64]`` for ``"w4"``, ``[N, K/32]`` for ``"nk"``),
    ``np_`` (N padded to 64 for ``"w4"``)."""

    def __init__(self, n, k, layout, data, sw8, np_):  # noqa: D107
        self.n, self.k, self.layout = int(n), int(k), layout
        self.data, self.sw8, self.np_ = data, sw8, int(np_)

    @property
    def nbytes(self) -> int:
        """Bytes a GEMM reads: packed codes + scale bytes (incl. the padding rows)."""
        return int(self.data.nbytes + self.sw8.nbytes)

    def __repr__(self) -> str:
        return f"PackedMXFP4(N={self.n}, K={self.k}, layout={self.layout!r})"


@njit_kernel(parallel=True)
def _pack_nibbles(codes, out, N, NP, K):
    """``codes`` uint8 ``[N, K/2]`` (low nibble = even k) -> ``out`` nibble blocks
    ``[NP/16][K/8][64]`` (see the module docstring); rows >= N get code 0."""
    KP = K // 8
    for blk in prange(NP // 16):
        for p in range(KP):
            base = (blk * KP + p) * 64
            for l in range(16):
                n = blk * 16 + l
                for bb in range(4):
                    v = np.uint8(0)
                    if n < N:
                        k0 = 8 * p + bb          # low nibble: k0; high nibble: k0 + 4
                        c0 = codes[n, k0 >> 1]
                        c1 = codes[n, (k0 + 4) >> 1]
                        lo = (c0 >> np.uint8(4)) if (k0 & 1) else (c0 & np.uint8(15))
                        hi = (c1 >> np.uint8(4)) if (k0 & 1) else (c1 & np.uint8(15))
                        v = np.uint8(lo | (hi << np.uint8(4)))
                    out[base + 4 * l + bb] = v


def pack_mxfp4(w: MXFP4Weight, layout: str | None = None) -> PackedMXFP4:
    """Pack an MXFP4 weight for this process's W4A8 kernel.

    Args: ``w`` an :class:`MXFP4Weight` (uint8 codes ``[N, K/2]``, UE8M0 bytes ``[N, K/32]``);
    ``layout`` ``None`` (the active dispatch path: ``"w4"`` from tier avx2, else ``"nk"``),
    ``"w4"`` or ``"nk"``.
    Raises TypeError for another weight type, RuntimeError for ``"w4"`` on a CPU without an
    INT8 tile, ValueError for an unknown layout or a NaN scale byte (255)."""
    if not isinstance(w, MXFP4Weight):
        raise TypeError(f"expected an MXFP4Weight, got {type(w).__name__}")
    if layout is None:
        layout = "w4" if jit.USE_INT8_TILES else "nk"
    N, K = (int(v) for v in w.shape)
    codes = w.packed.detach().contiguous().numpy()
    sc = w.scale.detach().contiguous().numpy()
    if sc.size and int(sc.max()) == 255:
        raise ValueError("MXFP4 scale byte 255 (NaN) cannot be packed")
    if layout == "w4":
        if jit.INT8_TILE is None:
            raise RuntimeError(f"layout='w4' needs an INT8 tile (avx2 or vnni); this CPU has none (tier {jit.TIER})")
        np_ = max(CHUNK_N, -(-N // CHUNK_N) * CHUNK_N)
        data = aligned_empty(np_ * K // 2, np.uint8)
        if K:
            _pack_nibbles(codes, data, N, np_, K)
        ng = K // MXFP4_BLOCK
        s = np.full((np_, ng), 127, np.uint8)
        s[:N] = sc
        sw8 = np.ascontiguousarray(s.reshape(np_ // CHUNK_N, CHUNK_N, ng).transpose(0, 2, 1))
        return PackedMXFP4(N, K, "w4", data, sw8, np_)
    if layout == "nk":
        return PackedMXFP4(N, K, "nk", codes, sc, N)
    raise ValueError(f"unknown layout {layout!r} (expected 'w4', 'nk' or None)")


def unpack_mxfp4(pw: PackedMXFP4) -> MXFP4Weight:
    """The :class:`MXFP4Weight` a packed weight was made from (bitwise)."""
    if pw.layout == "nk":
        return MXFP4Weight(torch.from_numpy(pw.data.copy()), torch.from_numpy(pw.sw8.copy()))
    ng = pw.k // MXFP4_BLOCK
    b = pw.data.reshape(pw.np_ // 16, pw.k // 8, 16, 4)                    # [blk, p, l, b]
    codes = np.stack((b & 15, b >> 4), axis=3)                              # [blk, p, l, h, b]
    codes = codes.transpose(0, 2, 1, 3, 4).reshape(pw.np_, pw.k)[:pw.n]     # k = 8p + 4h + b
    packed = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    sc = np.ascontiguousarray(pw.sw8.transpose(0, 2, 1).reshape(pw.np_, ng)[:pw.n])
    return MXFP4Weight(torch.from_numpy(packed), torch.from_numpy(sc))


# --------------------------------------------------------------------------- kernels
@njit_kernel
def _stile(ts, xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, accum):
    """One sub-tile of ``ts`` tokens (``f`` rows of 64)."""
    if ts == 1:
        _S1(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 2:
        _S2(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 3:
        _S3(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 4:
        _S4(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 5:
        _S5(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 6:
        _S6(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif ts == 8 or _TSMAX == 8:
        _S8(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    else:
        _S12(xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)


@njit_kernel
def _mtile(tt, xp, x_off, xks, wp, w_off, wbs, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, accum):
    """Float32 ``[tt, 64]`` tile over ``ng`` blocks (``tt`` in TILE_HEIGHTS; ``f`` rows of 64):
    the sub-tiles of :func:`.x86_w4a8.w4_plan`, units-major."""
    groups = (tt + _TSMAX - 1) // _TSMAX
    q = tt // groups
    r = tt - q * groups               # the first r token groups have q + 1 tokens
    us = _US[q + (r > 0)]
    for u0 in range(0, _NU, us):
        wo = w_off + (u0 // _UPB) * wbs + (u0 % _UPB) * _VB
        t0 = 0
        for gi in range(groups):
            ts = q + (gi < r)
            _stile(ts, xp, x_off + 4 * t0, xks, wp, wo, wbs, ng, sw, sw_off + _W * u0, sx, corr,
                   sc_off + t0 * NG, NG, f, f_off + t0 * CHUNK_N + _W * u0, accum)
            t0 += ts


@njit_kernel(parallel=True)
def _w4_core(xp, T, TP, K, wp, NP, N, sw8, sx, corr, out):
    """The W4A8 GEMM on the ``"w4"`` layout: ``xp`` int8 activations ``[K/4][TP][4]``,
    ``sx``/``corr`` ``[TP, K/32]`` (padding rows 0); writes float32 ``out`` ``[T, N]``. One
    64-column chunk per ``prange`` iteration."""
    NG = K // MXFP4_BLOCK
    wbs = K * 8                      # bytes of one 16-channel block's nibble stream
    xks = TP * 4
    gpk = max(1, K_CHUNK // MXFP4_BLOCK)
    sw = sw8.reshape(-1)
    sxf = sx.reshape(-1)
    cf = corr.reshape(-1)
    for c in prange(NP // CHUNK_N):
        f = np.empty(TP * CHUNK_N, np.float32)
        w_off = c * 4 * wbs
        sw_off = c * NG * CHUNK_N
        if TP <= MAX_TILE_T:
            _mtile(TP, xp, 0, xks, wp, w_off, wbs, NG, sw, sw_off, sxf, cf, 0, NG, f, 0, False)
        else:
            for g0 in range(0, NG, gpk):
                ng = min(NG, g0 + gpk) - g0
                t0 = 0
                while t0 < TP:
                    tt = min(MAX_TILE_T, TP - t0)
                    _mtile(tt, xp, g0 * 8 * xks + t0 * 4, xks, wp, w_off + g0 * 256, wbs, ng, sw,
                           sw_off + g0 * CHUNK_N, sxf, cf, t0 * NG + g0, NG, f, t0 * CHUNK_N, g0 > 0)
                    t0 += tt
        n0 = c * CHUNK_N
        m = min(N, n0 + CHUNK_N) - n0
        for t in range(T):
            out[t, n0:n0 + m] = f[t * CHUNK_N:t * CHUNK_N + m]


# --------------------------------------------------------------------------- several weights
class MXFP4Stack:
    """Same-shape ``"w4"`` :class:`PackedMXFP4` weights stacked for :func:`w4_parts_core`:
    ``data`` uint8 ``[G, Np·K/2]``, ``sw8`` uint8 ``[G, Np·K/32]``; ``n``, ``k``, ``np_``."""

    __slots__ = ("data", "k", "n", "np_", "sw8")

    def __init__(self, data, sw8, n, k, np_):  # noqa: D107
        self.data, self.sw8, self.n, self.k, self.np_ = data, sw8, int(n), int(k), int(np_)

    @property
    def parts(self) -> int:
        """Number of stacked weights G."""
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        return f"MXFP4Stack(G={self.parts}, N={self.n}, K={self.k})"


def stack_mxfp4(packs: list[PackedMXFP4]) -> MXFP4Stack:
    """Stack ``packs`` (same ``n``, ``k``, layout ``"w4"``) into one :class:`MXFP4Stack` and
    re-point every pack's ``data`` / ``sw8`` at its row of the stack (views: nothing is
    stored twice once the old arrays are dropped, one pack at a time). Raises ValueError for
    an empty list, mixed shapes or the ``"nk"`` layout."""
    if not packs:
        raise ValueError("stack_mxfp4 needs at least one packed weight")
    p0 = packs[0]
    for p in packs:
        if p.layout != "w4" or (p.n, p.k, p.np_) != (p0.n, p0.k, p0.np_):
            raise ValueError(f"MXFP4 packs to stack must share shape and the 'w4' layout: {p0!r} vs {p!r}")
    G = len(packs)
    data = aligned_empty(G * p0.data.size, np.uint8).reshape(G, p0.data.size)
    sw8 = np.empty((G, p0.sw8.size), np.uint8)
    for g, p in enumerate(packs):
        data[g] = p.data
        sw8[g] = p.sw8.reshape(-1)
        p.data, p.sw8 = data[g], sw8[g].reshape(p.sw8.shape)
    return MXFP4Stack(data, sw8, p0.n, p0.k, p0.np_)


@njit_kernel(parallel=True)
def quant_pack_w4_parts(x, rows, nrows, TP, xp, sx, corr):
    """The activations of several W4A8 GEMMs: part j takes token rows ``rows[j, :nrows[j]]``
    of float32 / bf16-bits ``x`` [T, K] -> ``xp`` int8 ``[J, K·TP]`` (the ``[K/4][TP][4]``
    layout per part, padding rows q = 0), ``sx`` float32 / ``corr`` int32 ``[J, TP·K/32]``
    (token t's block g at ``t·K/32 + g``; ``corr = -ZP·Σq``). Each token row is quantised
    once (the quantiser of :func:`mxfp4_gemm_linear`), then gathered into every part that
    takes it, so every part's operands are bitwise its own call's."""
    T, K = x.shape
    J = rows.shape[0]
    NG = K // MXFP4_BLOCK
    q = np.zeros((T, K), np.int8)
    sxt = np.empty((T, NG), np.float32)
    ct = np.empty((T, NG), np.int32)
    for t in prange(T):
        buf = np.empty(MXFP4_BLOCK, np.float32)
        quant_group_row(x[t], MXFP4_BLOCK, q[t], sxt[t], ct[t], -ZP, buf)
    for j in prange(J):
        g = np.zeros((TP, K), np.int8)
        for i in range(nrows[j]):
            r = rows[j, i]
            g[i] = q[r]
            sx[j, i * NG:(i + 1) * NG] = sxt[r]
            corr[j, i * NG:(i + 1) * NG] = ct[r]
        pack_words(g, xp[j].view(np.uint32), TP, np.uint32(0))


@njit_kernel(parallel=True)
def w4_parts_core(xp, sel, nrows, TP, K, wst, NP, N, swst, sx, corr, out):
    """Several W4A8 GEMMs in ONE parallel region: part j = activations ``xp[j]`` (from
    :func:`quant_pack_w4_parts`, ``TP`` a tile height <= 16) times stacked weight ``sel[j]``
    of ``wst`` / ``swst`` (:class:`MXFP4Stack` ``data`` / ``sw8``, ``NP`` padded rows, ``K``
    inputs) -> float32 ``out[j, t, :N]`` for ``t < nrows[j]``. One work item per (part,
    64-column chunk), the register tiles and fold of :func:`mxfp4_gemm_linear`: each part
    bitwise its own call."""
    NG = K // MXFP4_BLOCK
    wbs = K * 8
    xks = TP * 4
    cg = NP // CHUNK_N
    for c in prange(sel.shape[0] * cg):
        j = c // cg
        cl = c - j * cg
        g = sel[j]
        f = np.empty(TP * CHUNK_N, np.float32)
        _mtile(TP, xp[j], 0, xks, wst[g], cl * 4 * wbs, wbs, NG, swst[g], cl * NG * CHUNK_N, sx[j], corr[j], 0, NG,
               f, 0, False)
        n0 = cl * CHUNK_N
        m = min(N, n0 + CHUNK_N) - n0
        for t in range(nrows[j]):
            out[j, t, n0:n0 + m] = f[t * CHUNK_N:t * CHUNK_N + m]


#: Token counts up to which the activations are quantised serially (:func:`_quant_pack_serial`:
#: a ``prange`` launch of :func:`.gemm_group.quant_pack_groups` costs more than one row).
_SERIAL_QUANT_T = 2


@njit_kernel
def _quant_pack_serial(x, G, xp32, sx, corr, TP, zp):
    """:func:`.gemm_group.quant_pack_groups` (``xor = 0``) in one thread: the same
    :func:`.gemm_group.quant_group_row` per token and :func:`.gemm_group.pack_words`
    (bitwise the same ``xp``, ``sx``, ``corr``)."""
    T, K = x.shape
    q = np.zeros((T, K), np.int8)
    buf = np.empty(G, np.float32)
    for t in range(T):
        quant_group_row(x[t], G, q[t], sx[t], corr[t], zp, buf)
    pack_words(q, xp32, TP, np.uint32(0))


@njit_kernel(parallel=True)
def _w4_plain(xq, sx, codes, sw8, out):
    """Fallback: per row, decode the codes into int8 ``w2``, then per token and block an
    exact int32 dot and the fold."""
    T = xq.shape[0]
    N, KH = codes.shape
    K = 2 * KH
    NG = K // MXFP4_BLOCK
    for n in prange(N):
        w = np.empty(K, np.int8)
        cr = codes[n]
        for i in range(KH):
            v = cr[i]
            w[2 * i] = _LUT[v & np.uint8(15)]
            w[2 * i + 1] = _LUT[v >> np.uint8(4)]
        for t in range(T):
            y = np.float32(0.0)
            for g in range(NG):
                isum = dot_i8(xq[t, g * MXFP4_BLOCK:(g + 1) * MXFP4_BLOCK], w[g * MXFP4_BLOCK:(g + 1) * MXFP4_BLOCK])
                y = y + np.float32(np.float32(np.float32(isum) * sx[t, g]) * e8m0_to_f32(sw8[n, g]))
            out[t, n] = y


def mxfp4_gemm_linear(x: Any, w: PackedMXFP4) -> Any:
    """``y = x @ Wᵀ`` for a packed MXFP4 weight: per-32 activation quantisation, the W4A8
    GEMM and the block-ordered float32 fold, bitwise equal to the golden
    :func:`~llm_kernels.numerics.mxfp4.mxfp4_linear`.

    Args: ``x`` ``[..., K]`` float32 or bfloat16 (torch CPU tensor, numpy float32 or numpy
    uint16 bf16 bits); ``w`` from :func:`pack_mxfp4`.
    Returns float32 ``[..., N]`` (torch for torch input, else numpy).
    Raises ValueError for a K mismatch or a ``"w4"`` weight on a CPU without an INT8 tile."""
    a2, lead = kernel_rows(x, w.k)
    T = a2.shape[0]
    G, NG = MXFP4_BLOCK, w.k // MXFP4_BLOCK
    out = np.empty((T, w.n), np.float32)
    if out.size:
        if w.layout == "w4":
            if jit.INT8_TILE is None:
                raise ValueError("a 'w4' MXFP4 weight needs an INT8 tile (avx2 or vnni); this CPU has none")
            TP = padded_tokens(T)
            xp = np.empty(w.k * TP, np.int8)
            sx = np.zeros((TP, NG), np.float32)
            corr = np.zeros((TP, NG), np.int32)
            if T <= _SERIAL_QUANT_T:
                _quant_pack_serial(a2, G, xp.view(np.uint32), sx, corr, TP, -ZP)
            else:
                quant_pack_groups(a2, G, xp.view(np.uint32), sx, corr, TP, np.uint32(0), -ZP)
            _w4_core(xp, T, TP, w.k, w.data, w.np_, w.n, w.sw8, sx, corr, out)
        else:
            sx = np.empty((T, NG), np.float32)
            xq = np.empty((T, w.k), np.int8)
            quant_groups_rows(a2, G, xq, sx)
            _w4_plain(xq, sx, w.data, w.sw8, out)
    out = out.reshape(*lead, w.n)
    if not isinstance(x, np.ndarray):
        return torch.from_numpy(out)
    return out
