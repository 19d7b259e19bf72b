"""Group-scaled INT8 GEMM (the ``int8_g32`` scheme): INT8 weights and activations with one
scale per block of ``G`` = 32 inputs, llama.cpp Q8_0's granularity.

Golden: :func:`llm_kernels.numerics.group_quant.group_linear`::

    isum[t, n, g] = Σ_{k in block g} q_x[t, k] · q_w[n, k]                   exact int32
    y[t, n] = 0;  for g in blocks:  y = fl(y + fl(fl(f32(isum) · s_x[t, g]) · s_w[n, g]))

Every output is bitwise equal to it (same quantised inputs, exact block sums, the same
float32 operations in the same order; no fastmath, no FMA contraction).

**Register tiles** (tier avx2 and up): the broadcast layout of :mod:`.gemm` (weights
``[Np/16][K/4][16][4]``, activations ``[K/4][TP][4]``), one tile call per block of
``G/4`` k-groups into a chunk-local int32 buffer, then the block's *fold* into a float32
buffer of the chunk (``fl(fl(f32(acc - c)·s_x)·s_w)`` added in block order). The zero point
of the tile must not need per-block weight sums (that would be 4 more bytes per 32
weights), so:

* VNNI (``"vnni"``): the operands swap roles (:func:`.x86.vnni_group_tile`):
  activations are the *signed* broadcast operand (raw ``q``), weights the unsigned one,
  stored as ``w + 128`` (``w ^ 0x80``). Then ``Σ q·(w+128) = isum + 128·Σ_k q``: the
  correction ``c[t, g] = 128·Σ_{k in g} q_x[t, k]`` is a per-token, per-block integer made
  when the activations are quantised.
* AVX2 (``"avx2"``): the AVX2 tile's own sign folding returns the exact ``isum`` from
  the raw signed activations and signed weights: ``c = 0``.

Weight scales are kept as float16 bits (2 bytes per 32 weights: Q8_0's byte count),
chunk-major ``[Np/64][K/G][64]`` so that each 64-column chunk reads its scales as one
sequential stream next to its weights; the fold widens 64 of them at a time (VNNI:
``vcvtph2ps``; AVX2 and plain: :func:`f16_bits_to_f32`, exact).

Schedule as :mod:`.gemm`: ``prange`` over 64-column chunks; ``T <= 16`` one token tile,
the chunk's weights streamed once; ``T > 16`` K-blocks of 1024 inputs re-read from L2 by
each tile of 16 tokens. **Fallback** (tier plain): the plain ``[N, K]`` weight, per-block
int32 dot products (:func:`.gemm.dot_i8`) and the same fold.

Determinism: each output belongs to one ``prange`` iteration, blocks are folded in order,
so results are bitwise identical across calls and thread counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import prange

from ...numerics.group_quant import GroupQuantWeight
from . import jit
from .bf16 import kernel_rows, f32_from_bits, load_f32
from .gemm import (
    K_CHUNK,
    MAX_TILE_T,
    TILE_HEIGHTS,
    dot_i8,
    nb_for,
    padded_tokens,
    prefetch_for,
)
from .gemm_pack import CHUNK_N, aligned_empty, pack_w_bcast32
from .jit import njit_kernel
from .quant import quant_row_f32
from .x86_avx2 import avx2_bcast_tile
from .x86 import vnni_group_tile

__all__ = ["PackedGroupW8", "f16_bits_to_f32", "pack_group_w8", "group_gemm_linear", "quant_groups_rows",
           "quant_pack_groups", "unpack_group_w8"]

_F16_SUB = np.float32(2.0 ** -24)


@njit_kernel
def f16_bits_to_f32(h):
    """Non-negative finite float16 bits (uint16) -> float32, exact (normals by re-biasing the
    exponent, zero/subnormals as ``m · 2^-24``). Numba-callable; no F16C needed."""
    u = np.uint32(h)
    e = (u >> np.uint32(10)) & np.uint32(0x1F)
    m = u & np.uint32(0x3FF)
    norm = f32_from_bits(((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))
    return norm if e != 0 else np.float32(m) * _F16_SUB


#: AVX2 tiles of the fold-through-L1 kernel (:func:`_group_core`, the ``"avx2"`` layout only;
#: the VNNI layout runs :func:`_group_core_vnni`). Built lazily: never compiled elsewhere.
(_G1, _G2, _G3, _G4, _G5, _G6, _G8, _G12, _G16) = [
    avx2_bcast_tile(tt, nb_for(tt), prefetch_for(tt)) for tt in TILE_HEIGHTS]

#: VNNI grouped tiles (:func:`.x86.vnni_group_tile`): ``tt x nb`` with int and float accumulators in
#: zmm registers (tt = 2, 3: nb = 4; tt = 1 and tt <= 6: nb = 2; tt <= 12: nb = 1; 16 = two passes of 8).
(_R1, _R2, _R3, _R4, _R5, _R6, _R8, _R12) = [
    vnni_group_tile(tt, 4 if 2 <= tt <= 3 else (2 if tt <= 6 else 1), prefetch_for(tt))
    for tt in (1, 2, 3, 4, 5, 6, 8, 12)]


class PackedGroupW8:
    """A :class:`~llm_kernels.numerics.group_quant.GroupQuantWeight` in the form the
    grouped kernels read (built once at load by :func:`pack_group_w8`).

    Attributes: ``n``, ``k``, ``group`` (inputs per block), ``layout`` (``"vnni"``,
    ``"avx2"`` or ``"nk"``), ``data`` (packed weight bytes: uint8 ``w ^ 0x80`` for
    ``"vnni"``, int8 otherwise; ``"nk"``: the ``[N, K]`` int8 weight), ``sw16`` (uint16
    float16 bits: ``[Np/64, K/G, 64]`` for the tiled layouts, ``[N, K/G]`` for ``"nk"``),
    ``np_`` (N padded to 64 for the tiled layouts), ``scale`` (the float16 ``[N, K/G]``
    torch tensor)."""

    def __init__(self, n, k, group, layout, data, sw16, np_, scale):  # noqa: D107
        self.n, self.k, self.group, self.layout = int(n), int(k), int(group), layout
        self.data, self.sw16, self.np_, self.scale = data, sw16, int(np_), scale

    @property
    def nbytes(self) -> int:
        """Bytes a GEMM reads: packed weights + scales."""
        return int(self.data.nbytes + self.sw16.nbytes)

    def __repr__(self) -> str:
        return f"PackedGroupW8(N={self.n}, K={self.k}, G={self.group}, layout={self.layout!r})"


def pack_group_w8(w: GroupQuantWeight, layout: str | None = None) -> PackedGroupW8:
    """Pack a group-scaled INT8 weight for this process's grouped kernel.

    Args: ``w`` a :class:`GroupQuantWeight` (int8 ``[N, K]``, float16 ``[N, K/G]``);
    ``layout`` ``None`` (the active dispatch path), ``"vnni"``/``"avx2"`` (only the
    process's tile) or ``"nk"``.
    Raises TypeError for another weight type, RuntimeError for a tiled layout this
    process does not compile, ValueError for an unknown layout."""
    if not isinstance(w, GroupQuantWeight):
        raise TypeError(f"expected a GroupQuantWeight, got {type(w).__name__}")
    layout = jit.dispatch_path() if layout is None else layout
    if layout == "fallback":
        layout = "nk"
    q = w.qweight.detach().contiguous().numpy()
    bits = w.scale.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
    N, K = q.shape
    ng = K // w.group_size
    if layout in ("vnni", "avx2"):
        if layout != jit.INT8_TILE:
            raise RuntimeError(f"layout={layout!r} needs the {layout} INT8 tile; this process compiles "
                               f"{jit.INT8_TILE or 'none'} (tier {jit.TIER})")
        np_ = max(CHUNK_N, -(-N // CHUNK_N) * CHUNK_N)
        wp = aligned_empty(np_ * K, np.int8)
        if N and K:
            pack_w_bcast32(q.view(np.uint32), wp.view(np.uint32), K // 4, np_ // 16)
        if layout == "vnni":
            wp = wp.view(np.uint8)
            wp ^= np.uint8(0x80)
        sw = np.zeros((np_, ng), np.uint16)
        sw[:N] = bits
        sw16 = np.ascontiguousarray(sw.reshape(np_ // CHUNK_N, CHUNK_N, ng).transpose(0, 2, 1))
        return PackedGroupW8(N, K, w.group_size, layout, wp, sw16, np_, w.scale)
    if layout == "nk":
        return PackedGroupW8(N, K, w.group_size, "nk", np.ascontiguousarray(q), np.ascontiguousarray(bits), N,
                             w.scale)
    raise ValueError(f"unknown layout {layout!r} (expected 'vnni', 'avx2', 'nk' or None)")


def unpack_group_w8(pw: PackedGroupW8) -> GroupQuantWeight:
    """The :class:`GroupQuantWeight` a packed weight was made from (bitwise)."""
    if pw.layout == "nk":
        return GroupQuantWeight(torch.from_numpy(pw.data.copy()), pw.scale, pw.group)
    raw = pw.data.view(np.int8) ^ np.int8(-128) if pw.layout == "vnni" else pw.data
    t = raw.reshape(pw.np_ // 16, pw.k // 4, 16, 4).transpose(0, 2, 1, 3)
    q = np.ascontiguousarray(t.reshape(pw.np_, pw.k)[:pw.n])
    return GroupQuantWeight(torch.from_numpy(q), pw.scale, pw.group)


# --------------------------------------------------------------------------- kernels
@njit_kernel
def _gtile(tt, xp, x_off, xks, wp, w_off, wbs, nkg, acc):
    """int32 tile ``[tt, 64]`` of one block (``nkg`` k-groups) into ``acc`` (stride 64)."""
    if tt == 1:
        _G1(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 2:
        _G2(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 3:
        _G3(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 4:
        _G4(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 5:
        _G5(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 6:
        _G6(xp, x_off, xks, wp, w_off, wbs, nkg, acc, 0, CHUNK_N, False)
    elif tt == 8:
        for j in range(2):
            _G8(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, nkg, acc, j * 32, CHUNK_N, False)
    elif tt == 12:
        for j in range(2):
            _G12(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, nkg, acc, j * 32, CHUNK_N, False)
    else:
        for j in range(4):
            _G16(xp, x_off, xks, wp, w_off + j * wbs, wbs, nkg, acc, j * 16, CHUNK_N, False)


@njit_kernel
def _rtile(tt, xp, x_off, xks, wp, w_off, wbs, gkg, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, accum):
    """Float32 ``[tt, 64]`` tile over ``ng`` blocks with the VNNI grouped register tiles
    (token rows from ``sc_off // NG``; ``f`` rows of 64)."""
    if tt == 1:  # two passes of 32 columns: measured steadier than one of 64 at T=1 (2 + 1 streams)
        for j in range(2):
            _R1(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, gkg, ng, sw, sw_off + j * 32, sx, corr, sc_off,
                NG, f, f_off + j * 32, CHUNK_N, accum)
    elif tt == 2:
        _R2(xp, x_off, xks, wp, w_off, wbs, gkg, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif tt == 3:
        _R3(xp, x_off, xks, wp, w_off, wbs, gkg, ng, sw, sw_off, sx, corr, sc_off, NG, f, f_off, CHUNK_N, accum)
    elif tt == 4:
        for j in range(2):
            _R4(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, gkg, ng, sw, sw_off + j * 32, sx, corr, sc_off,
                NG, f, f_off + j * 32, CHUNK_N, accum)
    elif tt == 5:
        for j in range(2):
            _R5(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, gkg, ng, sw, sw_off + j * 32, sx, corr, sc_off,
                NG, f, f_off + j * 32, CHUNK_N, accum)
    elif tt == 6:
        for j in range(2):
            _R6(xp, x_off, xks, wp, w_off + j * 2 * wbs, wbs, gkg, ng, sw, sw_off + j * 32, sx, corr, sc_off,
                NG, f, f_off + j * 32, CHUNK_N, accum)
    elif tt == 8:
        for j in range(4):
            _R8(xp, x_off, xks, wp, w_off + j * wbs, wbs, gkg, ng, sw, sw_off + j * 16, sx, corr, sc_off,
                NG, f, f_off + j * 16, CHUNK_N, accum)
    elif tt == 12:
        for j in range(4):
            _R12(xp, x_off, xks, wp, w_off + j * wbs, wbs, gkg, ng, sw, sw_off + j * 16, sx, corr, sc_off,
                 NG, f, f_off + j * 16, CHUNK_N, accum)
    else:
        for h in range(2):
            for j in range(4):
                _R8(xp, x_off + h * 32, xks, wp, w_off + j * wbs, wbs, gkg, ng, sw, sw_off + j * 16, sx, corr,
                    sc_off + h * 8 * NG, NG, f, f_off + h * 8 * CHUNK_N + j * 16, CHUNK_N, accum)


@njit_kernel(parallel=True)
def _group_core_vnni(xp, T, TP, KG, gkg, wp, NP, N, sw16, sx, corr, out):
    """The VNNI grouped GEMM: as :func:`_group_core` but every tile keeps its block sums
    and float accumulators in registers (:func:`.x86.vnni_group_tile`); ``sx``/``corr`` have ``TP``
    rows (padding rows 0)."""
    NG = KG // gkg
    wbs = KG * 64
    xks = TP * 4
    gpk = max(1, (K_CHUNK // 4) // gkg)
    sw = sw16.reshape(-1)
    sxf = sx.reshape(-1)
    cf = corr.reshape(-1)
    for c in prange(NP // CHUNK_N):
        f = np.empty(TP * CHUNK_N, np.float32)
        w_off = c * 4 * wbs
        sw_off = c * NG * CHUNK_N
        if TP <= MAX_TILE_T:
            _rtile(TP, xp, 0, xks, wp, w_off, wbs, gkg, NG, sw, sw_off, sxf, cf, 0, NG, f, 0, False)
        else:
            for g0 in range(0, NG, gpk):
                ng = min(NG, g0 + gpk) - g0
                t0 = 0
                while t0 < TP:
                    tt = min(MAX_TILE_T, TP - t0)
                    _rtile(tt, xp, g0 * gkg * xks + t0 * 4, xks, wp, w_off + g0 * gkg * 64, wbs, gkg, ng, sw,
                           sw_off + g0 * CHUNK_N, sxf, cf, t0 * NG + g0, NG, f, t0 * CHUNK_N, g0 > 0)
                    t0 += tt
        n0 = c * CHUNK_N
        m = min(N, n0 + CHUNK_N) - n0
        for t in range(T):
            out[t, n0:n0 + m] = f[t * CHUNK_N:t * CHUNK_N + m]


@njit_kernel
def _fold(acc, f, t0, t1, g, sx, corr, swf):
    """``f[t, i] += fl(fl(f32(acc[t - t0, i] - corr[t, g]) · sx[t, g]) · swf[i])`` for
    tokens ``t0 <= t < t1`` (``acc`` rows of 64 from ``t0``; ``f`` rows of 64)."""
    for t in range(t0, t1):
        a = acc[(t - t0) * CHUNK_N:(t - t0 + 1) * CHUNK_N]
        o = f[t * CHUNK_N:(t + 1) * CHUNK_N]
        c = corr[t, g]
        s = sx[t, g]
        for i in range(CHUNK_N):
            o[i] = o[i] + np.float32(np.float32(np.float32(np.int32(a[i] - c)) * s) * swf[i])


@njit_kernel(parallel=True)
def _group_core(xp, T, TP, KG, gkg, wp, NP, N, sw16, sx, corr, out):
    """The grouped register-tile GEMM: ``xp`` packed activations ``[KG][TP][4]``, ``wp``
    packed weights, ``sw16`` ``[NP/64, NG, 64]`` float16 bits, ``sx``/``corr`` ``[T, NG]``;
    writes float32 ``out`` ``[T, N]``. One 64-column chunk per ``prange`` iteration."""
    NG = KG // gkg
    wbs = KG * 64
    xks = TP * 4
    gpk = max(1, (K_CHUNK // 4) // gkg)  # blocks per K-block (T > 16)
    for c in prange(NP // CHUNK_N):
        acc = np.empty(MAX_TILE_T * CHUNK_N, np.int32)
        f = np.zeros(T * CHUNK_N, np.float32)
        swf = np.empty(CHUNK_N, np.float32)
        w_off = c * 4 * wbs
        if TP <= MAX_TILE_T:
            for g in range(NG):
                _gtile(TP, xp, g * gkg * xks, xks, wp, w_off + g * gkg * 64, wbs, gkg, acc)
                s16 = sw16[c, g]
                for i in range(CHUNK_N):
                    swf[i] = f16_bits_to_f32(s16[i])
                _fold(acc, f, 0, T, g, sx, corr, swf)
        else:
            for g0 in range(0, NG, gpk):
                g1 = min(NG, g0 + gpk)
                t0 = 0
                while t0 < TP:
                    tt = min(MAX_TILE_T, TP - t0)
                    for g in range(g0, g1):
                        _gtile(tt, xp, g * gkg * xks + t0 * 4, xks, wp, w_off + g * gkg * 64, wbs, gkg, acc)
                        s16 = sw16[c, g]
                        for i in range(CHUNK_N):
                            swf[i] = f16_bits_to_f32(s16[i])
                        _fold(acc, f, t0, min(t0 + tt, T), g, sx, corr, swf)
                    t0 += tt
        n0 = c * CHUNK_N
        m = min(N, n0 + CHUNK_N) - n0
        for t in range(T):
            out[t, n0:n0 + m] = f[t * CHUNK_N:t * CHUNK_N + m]


@njit_kernel
def quant_group_row(xr, G, qrow, sx_row, corr_row, zp, buf):
    """One token of :func:`quant_pack_groups`: per block of ``G`` inputs of ``xr`` [K] the
    int8 ``qrow`` [K], the scale ``sx_row[g]`` (:func:`.quant.quant_row_f32`) and
    ``corr_row[g] = zp · Σ q`` (``buf``: float32 [G] scratch)."""
    NG = xr.shape[0] // G
    for g in range(NG):
        for i in range(G):
            buf[i] = load_f32(xr[g * G + i])
        qg = qrow[g * G:(g + 1) * G]
        sx_row[g] = quant_row_f32(buf, qg)
        s = np.int32(0)
        for i in range(G):
            s += np.int32(qg[i])
        corr_row[g] = np.int32(zp * s)


@njit_kernel
def pack_words(q, xp32, TP, xor):
    """The serial pack of int8 ``q`` [T, K] into ``xp32`` ``[K/4][TP]`` uint32 words (each
    XOR ``xor``; rows ``T … TP-1`` hold q = 0, i.e. ``xor``)."""
    T, K = q.shape
    KG = K // 4
    q32 = q.view(np.uint32)
    for t in range(T):
        row = q32[t]
        for kg in range(KG):
            xp32[kg * TP + t] = row[kg] ^ xor
    for kg in range(KG):
        for t in range(T, TP):
            xp32[kg * TP + t] = xor


@njit_kernel(parallel=True)
def quant_pack_groups(x, G, xp32, sx, corr, TP, xor, zp):
    """Per-block quantisation of float32/bf16 ``x`` [T, K] (bit-exact golden), the
    correction ``corr[t, g] = zp · Σ_{k in g} q`` and the serial pack into ``[K/4][TP][4]``
    (each 4-byte word XOR ``xor``; padding rows hold q = 0): :func:`quant_group_row` per
    token in parallel, then :func:`pack_words`."""
    T, K = x.shape
    q = np.zeros((T, K), np.int8)
    for t in prange(T):
        buf = np.empty(G, np.float32)
        quant_group_row(x[t], G, q[t], sx[t], corr[t], zp, buf)
    pack_words(q, xp32, TP, xor)


@njit_kernel(parallel=True)
def quant_groups_rows(x, G, q, sx):
    """Per-block quantisation of float32/bf16 ``x`` [T, K] (bit-exact golden
    :func:`~llm_kernels.numerics.group_quant.quant_groups`) into int8 ``q`` [T, K] and float32
    ``sx`` [T, K/G], rows in parallel (the plain kernels' activations)."""
    T, K = x.shape
    for t in prange(T):
        buf = np.empty(G, np.float32)
        xr = x[t]
        for g in range(K // G):
            for i in range(G):
                buf[i] = load_f32(xr[g * G + i])
            sx[t, g] = quant_row_f32(buf, q[t, g * G:(g + 1) * G])


@njit_kernel(parallel=True)
def _group_plain(xq, sx, G, wq, sw16, out):
    """Fallback: per-block exact int32 dots on the plain ``[N, K]`` weight, the same fold."""
    T = xq.shape[0]
    NG = wq.shape[1] // G
    for n in prange(wq.shape[0]):
        wr = wq[n]
        for t in range(T):
            y = np.float32(0.0)
            for g in range(NG):
                isum = dot_i8(xq[t, g * G:(g + 1) * G], wr[g * G:(g + 1) * G])
                y = y + np.float32(np.float32(np.float32(isum) * sx[t, g]) * f16_bits_to_f32(sw16[n, g]))
            out[t, n] = y


def group_gemm_linear(x: Any, w: PackedGroupW8) -> Any:
    """``y = x @ Wᵀ`` for a packed group-scaled weight: per-block activation quantisation,
    the grouped INT8 GEMM and the block-ordered float32 fold in one Numba call, bitwise
    equal to the golden :func:`~llm_kernels.numerics.group_quant.group_linear`.

    Args: ``x`` ``[..., K]`` float32 or bfloat16 (torch CPU tensor, numpy float32 or numpy
    uint16 bf16 bits); ``w`` from :func:`pack_group_w8`.
    Returns float32 ``[..., N]`` (torch for torch input, else numpy).
    Raises ValueError for a K mismatch or a packed layout of another tier."""
    a2, lead = kernel_rows(x, w.k)
    T = a2.shape[0]
    G, NG = w.group, w.k // w.group
    out = np.empty((T, w.n), np.float32)
    if out.size:
        if w.layout in ("vnni", "avx2"):
            if w.layout != jit.INT8_TILE:
                raise ValueError(f"weight layout is {w.layout!r}, this process's tile is {jit.INT8_TILE!r}")
            TP = padded_tokens(T)
            vnni = w.layout == "vnni"
            xp = np.empty(w.k * TP, np.int8 if vnni else np.uint8)
            sx = np.zeros((TP, NG), np.float32)
            corr = np.zeros((TP, NG), np.int32)
            quant_pack_groups(a2, G, xp.view(np.uint32), sx, corr, TP, np.uint32(0), 128 if vnni else 0)
            core = _group_core_vnni if vnni else _group_core
            core(xp, T, TP, w.k // 4, G // 4, w.data, w.np_, w.n, w.sw16, sx, corr, out)
        else:
            sx = np.empty((T, NG), np.float32)
            xq = np.empty((T, w.k), np.int8)
            quant_groups_rows(a2, G, xq, sx)
            _group_plain(xq, sx, G, w.data, w.sw16, out)
    out = out.reshape(*lead, w.n)
    if not isinstance(x, np.ndarray):
        return torch.from_numpy(out)
    return out
