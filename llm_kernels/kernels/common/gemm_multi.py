"""Several INT8 GEMMs in one parallel region: the decode-time form of grouped projections
(DeepSeek-V4's ``wo_a`` / ``wo_b``) and of a mixture of experts.

At decode a stage of small GEMMs (8 groups of 4 MiB, 7 experts of 8-17 MiB) costs more
than its bytes when it runs one Numba call per GEMM: every call is two parallel regions
(activation packing, then the tiles), each region ends with both threads waiting for the
slower one, and the hardware prefetchers restart on every weight. Measured on the 2-core
Zen 5 guest (tier avx512-vnni-bf16, T=1, K=4096, weights cold): one 33.5 MB weight
0.51-0.64 ms, the same bytes as 8 calls of 4.19 MB 0.69-0.89 ms. These kernels run all
parts of a stage as the work items of ONE ``prange`` over (part, 64-column chunk), with
the same register tiles (:func:`.gemm.chunk_acc`) and the same epilogue arithmetic, so
each part's result is bitwise what :func:`.gemm.w8a8_gemm` / :func:`.gemm.w8a8_linear`
give for it alone.

Weights: the parts' packed weights (same shape, a tiled layout) are stacked once at load
(:func:`stack_packs`: one ``[G, bytes]`` array; each :class:`~.gemm_pack.PackedW8A8`'s
``data`` becomes a view of its row, so nothing is stored twice) with their scales and
zero-point sums as ``[G, Np]`` arrays.

Two shapes of work:

* :func:`rows_core` — part j multiplies its own activations by weight ``sel[j]`` of the
  stack: ``out[j, t, n] = rnd(fl(fl(f32(acc) · sx[j, t]) · sw[sel[j], n]))`` (grouped
  ``wo_a``: part = group; MoE: part = expert, ``sel`` = the experts routed in this step).
* :func:`cols_core` — the parts are slices of the input dimension of one weight (grouped
  ``wo_b``): ``out[t, n] = rnd(fl(Σ_g fl(f32(acc_g) · s[t, g])) · sw[n])``, groups summed
  in order from 0.0 like the golden's ``out += acc.float() * s[:, g]``.

Activations are quantised per (part, token) row (bit-exact golden ``quant_per_row``) and
packed into ``[J][KG][TP][4]`` u8 (:func:`quant_pack_parts`, :func:`pack_rows_parts`), one
padded token count ``TP`` for all parts (``T <= 16``: one register tile per chunk;
padding rows are q = 0 and never read back). Determinism: integer accumulation is exact
and every output is written by one work item, so results are bitwise identical across
thread counts.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .bf16 import round_f32 as _rnd
from .gemm import chunk_acc, pack_q32
from .gemm_pack import CHUNK_N, PackedW8A8, aligned_empty, is_tiled
from .jit import njit_kernel
from .quant import quant_row_f32

__all__ = ["PackStack", "cols_core", "pack_rows_parts", "quant_pack_parts", "rows_core", "stack_packs"]


class PackStack:
    """Same-shape tiled :class:`PackedW8A8` weights stacked for the multi-GEMM kernels.

    Attributes: ``data`` int8 ``[G, Np·Kp]`` (64-byte aligned rows), ``scale`` float32
    ``[G, Np]`` and ``wsum128`` int32 ``[G, Np]`` (zero past ``n``), ``n``, ``k``, ``kp``,
    ``np_``, ``layout`` (shared by every part)."""

    __slots__ = ("data", "k", "kp", "layout", "n", "np_", "scale", "wsum128")

    def __init__(self, data, scale, wsum128, n, k, kp, np_, layout):
        self.data, self.scale, self.wsum128 = data, scale, wsum128
        self.n, self.k, self.kp, self.np_, self.layout = n, k, kp, np_, layout

    @property
    def parts(self) -> int:
        """Number of stacked weights G."""
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        return f"PackStack(G={self.parts}, N={self.n}, K={self.k}, layout={self.layout!r})"


def stack_packs(packs: list[PackedW8A8]) -> PackStack:
    """Stack ``packs`` (same ``n``, ``k`` and tiled layout) into one :class:`PackStack` and
    re-point every pack's ``data`` at its row of the stack (the separate copies are freed
    once nothing else holds them). Raises ValueError for an empty list, mixed shapes or
    layouts, or the plain ``"nk"`` layout (the register-tile kernels read the stack)."""
    if not packs:
        raise ValueError("stack_packs needs at least one packed weight")
    p0 = packs[0]
    for p in packs:
        if (p.n, p.k, p.kp, p.np_, p.layout) != (p0.n, p0.k, p0.kp, p0.np_, p0.layout):
            raise ValueError(f"packs to stack must share shape and layout: {p0!r} vs {p!r}")
    if not is_tiled(p0.layout):
        raise ValueError(f"stack_packs needs a tiled layout, got {p0.layout!r}")
    G, size = len(packs), p0.np_ * p0.kp
    data = aligned_empty(G * size, np.int8).reshape(G, size)
    scale = np.zeros((G, p0.np_), np.float32)
    wsum128 = np.zeros((G, p0.np_), np.int32)
    for g, p in enumerate(packs):
        data[g] = p.data
        p.data = data[g]
        scale[g, :p.n] = p.scale
        wsum128[g] = p.wsum128
    return PackStack(data, scale, wsum128, p0.n, p0.k, p0.kp, p0.np_, p0.layout)


# --------------------------------------------------------------------------- activations
@njit_kernel(parallel=True)
def quant_pack_parts(x, nrows, xp, sx, TP, KG):
    """Quantise and pack per-part activations: ``x`` [J, T, K] float32 (part j's first
    ``nrows[j]`` rows are used) -> ``xp`` [J, KG·TP·4] u8 (the ``[KG][TP][4]`` tile layout
    per part, padding rows q = 0), ``sx`` [J, T] per-row scales."""
    J, T, K = x.shape
    q = np.zeros((J, TP, KG * 4), np.int8)
    for i in prange(J * T):
        j = i // T
        t = i - j * T
        if t < nrows[j]:
            sx[j, t] = quant_row_f32(x[j, t], q[j, t, :K])
    for j in prange(J):
        pack_q32(q[j].view(np.uint32), xp[j].view(np.uint32), nrows[j], TP)


@njit_kernel(parallel=True)
def pack_rows_parts(q32, rows, nrows, xp, TP):
    """Pack already-quantised token rows for each part: ``q32`` [T, KG] (int8 rows of
    width 4·KG, zero-padded, viewed as uint32), part j takes rows ``rows[j, :nrows[j]]``
    -> ``xp`` [J, KG·TP·4] u8 (:func:`.gemm.pack_q32`'s layout on the gathered rows)."""
    J = rows.shape[0]
    KG = q32.shape[1]
    for j in prange(J):
        n = nrows[j]
        g = np.empty((n, KG), np.uint32)
        for t in range(n):
            g[t] = q32[rows[j, t]]
        pack_q32(g, xp[j].view(np.uint32), n, TP)


# --------------------------------------------------------------------------- GEMM cores
@njit_kernel(parallel=True)
def rows_core(xp, sel, nrows, TP, KG, wst, wsum128, sw, NOUT, sx, to_bf16, out):
    """Part j = ``xp[j]`` times stacked weight ``sel[j]`` (``wst`` [G, Np·Kp] int8):
    ``out[j, t, n] = rnd(fl(fl(f32(acc - wsum128[g, n]) · sx[j, t]) · sw[g, n]))`` for
    ``t < nrows[j]``, ``n < NOUT`` (``rnd`` = bf16 rounding when ``to_bf16``). One work item
    per (part, 64-column chunk)."""
    J = sel.shape[0]
    cg = wsum128.shape[1] // CHUNK_N
    for c in prange(J * cg):
        j = c // cg
        cl = c - j * cg
        g = sel[j]
        acc = np.empty(TP * CHUNK_N, np.int32)
        chunk_acc(cl, xp[j], TP, KG, wst[g], acc)
        n0 = cl * CHUNK_N
        m = min(NOUT, n0 + CHUNK_N) - n0
        ws = wsum128[g, n0:n0 + m]
        s_w = sw[g, n0:n0 + m]
        for t in range(nrows[j]):
            a = acc[t * CHUNK_N:t * CHUNK_N + m]
            o = out[j, t, n0:n0 + m]
            s = sx[j, t]
            for i in range(m):
                o[i] = _rnd(np.float32(np.float32(np.float32(np.int32(a[i] - ws[i])) * s) * s_w[i]), to_bf16)


@njit_kernel(parallel=True)
def cols_core(xp, T, TP, KG, wst, wsum128, s, sw, N, to_bf16, out):
    """Grouped input columns: group g's activations ``xp[g]`` times ``wst[g]`` ([N, K/G]
    slices of one weight), ``out[t, n] = rnd(fl(Σ_g fl(f32(acc_g - wsum128[g, n]) ·
    s[t, g])) · sw[n])`` (groups in order, from 0.0). One work item per 64-column chunk,
    all groups inside it."""
    G = wst.shape[0]
    for c in prange(wsum128.shape[1] // CHUNK_N):
        acc = np.empty(TP * CHUNK_N, np.int32)
        tot = np.zeros(T * CHUNK_N, np.float32)
        n0 = c * CHUNK_N
        m = min(N, n0 + CHUNK_N) - n0
        for g in range(G):
            chunk_acc(c, xp[g], TP, KG, wst[g], acc)
            ws = wsum128[g, n0:n0 + m]
            for t in range(T):
                sg = s[t, g]
                a = acc[t * CHUNK_N:t * CHUNK_N + m]
                v = tot[t * CHUNK_N:t * CHUNK_N + m]
                for i in range(m):
                    v[i] = np.float32(v[i] + np.float32(np.float32(np.int32(a[i] - ws[i])) * sg))
        s_w = sw[n0:n0 + m]
        for t in range(T):
            v = tot[t * CHUNK_N:t * CHUNK_N + m]
            o = out[t, n0:n0 + m]
            for i in range(m):
                o[i] = _rnd(np.float32(v[i] * s_w[i]), to_bf16)
