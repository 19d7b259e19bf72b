"""The decode path of the W8A8 ``moe``: every expert of a step in ONE parallel region per
weight (:mod:`..common.gemm_multi`) instead of two GEMM calls per expert.

A decode step at Flash dims runs 6 routed experts and the shared one per layer: 14 GEMM
calls of 8-17 MiB, each two parallel regions (packing, tiles) plus a SwiGLU region, with
the threads waiting for each other at every end and the prefetchers restarting on every
weight. Here the step's experts are the parts of one multi-GEMM:

0. the step's routing becomes the parts in one serial pass (:func:`route_parts`: used
   experts, each one's token rows and slots, their scales; no numpy call per expert);
1. the token rows (quantised once, bit-exact golden per-row INT8) are packed per expert
   (its routed tokens; the shared expert: all of them);
2. ``[w1; w3]`` of every expert in one region (:func:`..common.gemm_multi.rows_core` over
   the layer's stacked packs, :func:`stack_experts`), unrounded dequant as
   :func:`..common.gemm.w8a8_gemm`;
3. one kernel: SwiGLU (``rnd`` of g and u, the clamps, ``rnd(rnd(silu(g))·u)``), the
   per-row INT8 requantisation of h for every (expert, token) row and the packing;
4. every expert's w2 in one region; the outputs go back to their (token, slot) places in
   one pass (:func:`scatter_parts`).

The results are bitwise those of :func:`.moe._expert_raw` per expert (same integers, the
same fp32 epilogue order, the same SwiGLU arithmetic), so ``moe`` gives the same bits on
either path. Used when every active expert and the shared one are prepared W8A8 experts
of one stack and each runs at most 16 rows (one register tile per chunk); otherwise
``moe`` runs its per-expert calls.

MXFP4 routed experts (kept 4-bit, a release checkpoint's) run the same way
(:func:`multi_mxfp4_raw`): the token rows quantised per 32 inputs for each part
(:func:`..common.gemm_mxfp4.quant_pack_w4_parts`), every routed expert's ``[w1; w3]`` in one
W4A8 region (:func:`..common.gemm_mxfp4.w4_parts_core` over the layer's
:class:`MXFP4ExpertStack`), one kernel for SwiGLU and the per-32 quantisation of h, every w2
in one region: bitwise :func:`.moe._expert_raw`'s per-expert W4A8 calls. The shared
expert (FP8 -> INT8 in a release) keeps its own path.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ...numerics.mxfp4 import MXFP4_BLOCK
from ..common.bf16 import round_f32 as _rnd
from ..common.gemm import MAX_TILE_T, PADDED_T, pack_q32, padded_tokens
from ..common.gemm_group import pack_words, quant_group_row
from ..common.gemm_mxfp4 import MXFP4Stack, quant_pack_w4_parts, stack_mxfp4, w4_parts_core
from ..common.gemm_multi import pack_rows_parts, rows_core, stack_packs
from ..common.jit import njit_kernel, sized
from ..common.quant import quant_row_f32
from ..common.vecmath import sleef_expf as _sleef_expf
from ..common.x86_w4a8 import ZP

__all__ = ["ExpertStack", "MXFP4ExpertStack", "multi_expert_parts", "multi_expert_raw", "multi_mxfp4_parts",
           "multi_mxfp4_raw", "route_parts", "scatter_parts", "stack_experts", "stack_mxfp4_experts", "stack_slots",
           "stacked_moe_program", "swiglu_row"]


class ExpertStack:
    """The stacked ``[w1; w3]`` and w2 packs of one layer's W8A8 experts (routed and
    shared): ``p13``, ``p2`` (:class:`..common.gemm_multi.PackStack`), ``inter`` (I)."""

    __slots__ = ("inter", "p13", "p2", "slot_cache")

    def __init__(self, p13, p2, inter: int):
        self.p13, self.p2, self.inter = p13, p2, inter
        #: ``(experts list, slots or None)``: the stack slot of each routed expert of the
        #: last expert list seen (:func:`stack_slots`)
        self.slot_cache = None


def stack_slots(st: ExpertStack, experts: list, slot_of) -> np.ndarray | None:
    """The stack slot of every routed expert of ``experts`` [E] int64 (-1: not a member of
    ``st``), built on the second call with the same list object (an engine passes one list
    per layer every step; a list seen once gets None, and the caller looks its used experts
    up itself). ``slot_of(ws)`` gives the slot of expert ``ws`` in ``st`` or -1."""
    c = st.slot_cache
    if c is None or c[0] is not experts:
        st.slot_cache = (experts, None)
        return None
    if c[1] is None:
        st.slot_cache = c = (experts, np.array([slot_of(ws) for ws in experts], np.int64))
    return c[1]


def stack_experts(packs: list) -> ExpertStack | None:
    """Stack the :class:`.moe.ExpertPack` s of one layer (same shapes, a tiled layout) and
    mark each with ``stack`` and its ``slot``; None (nothing changed) when they cannot be
    stacked (mixed shapes, the plain ``"nk"`` layout, fewer than two experts)."""
    if len(packs) < 2:
        return None
    try:
        p13 = stack_packs([p.p13 for p in packs])
    except ValueError:
        return None
    try:
        p2 = stack_packs([p.p2 for p in packs])
    except ValueError:  # pragma: no cover - p13 stacked, so the w2 packs match too
        return None
    st = ExpertStack(p13, p2, packs[0].inter)
    for i, p in enumerate(packs):
        p.stack, p.slot = st, i
    return st


@njit_kernel
def _silu(g):
    """torch's fp32 ``silu``: ``x / (1 + exp(-x))`` with the SLEEF ``exp``."""
    return np.float32(g / np.float32(np.float32(1.0) + _sleef_expf(-g)))


@njit_kernel
def swiglu_row(row, I, limit, to_bf16, buf):
    """``buf[i] = rnd(rnd(silu(g))·u)`` for one row ``row`` [2I] (g | u, unrounded GEMM
    outputs): ``g, u = rnd(.)``, clamps (``limit > 0``: ``g <= L``, ``-L <= u <= L``).
    The SwiGLU arithmetic of every W8A8 / float expert path (torch's op order)."""
    for i in range(I):
        g = _rnd(row[i], to_bf16)
        u = _rnd(row[I + i], to_bf16)
        if limit > 0:
            g = min(g, limit)
            u = min(max(u, -limit), limit)
        buf[i] = _rnd(np.float32(_rnd(_silu(g), to_bf16) * u), to_bf16)


@njit_kernel
def _swiglu_part_row(gu, r, nrows, I, limit, to_bf16, buf):
    """Item ``r`` of the (part j, row t) grid of ``gu`` [J, T, 2I]: ``(j, t, True)`` with
    ``buf`` = :func:`swiglu_row` of ``gu[j, t]`` when ``t < nrows[j]``, else ``(j, t, False)``
    (a padding row, ``buf`` untouched)."""
    T = gu.shape[1]
    j = r // T
    t = r - j * T
    if t >= nrows[j]:
        return j, t, False
    swiglu_row(gu[j, t], I, limit, to_bf16, buf)
    return j, t, True


@njit_kernel(parallel=True)
def _swiglu_quant_parts(gu, nrows, I, limit, to_bf16, hq, sh, xp, TP):
    """Per (part j, row t < nrows[j]) of ``gu`` [J, T, 2I] (g | u, unrounded GEMM outputs):
    ``h = rnd(rnd(silu(rnd g))·rnd u)`` with the ``swiglu_limit`` clamps, quantised per row
    into ``hq[j, t, :I]`` (int8, zero-padded rows) and ``sh[j, t]`` (:func:`.moe._swiglu`'s
    arithmetic exactly), then packed per part into ``xp`` [J, KG·TP·4] u8."""
    J, T, _ = gu.shape
    for r in prange(J * T):
        buf = np.empty(I, np.float32)
        j, t, ok = _swiglu_part_row(gu, r, nrows, I, limit, to_bf16, buf)
        if ok:
            sh[j, t] = quant_row_f32(buf, hq[j, t, :I])
    for j in prange(J):
        pack_q32(hq[j].view(np.uint32), xp[j].view(np.uint32), nrows[j], TP)


def _part_rows(rows: list[np.ndarray]) -> tuple | None:
    """``(nr, tmax, TP, ridx)`` of the parts' token rows: row counts, the largest, its padded
    tile height and the rows as a zero-padded ``[J, tmax]`` int64 array; None when there is
    no row or a part has more than 16 (one register tile per chunk)."""
    nr = np.array([len(r) for r in rows], np.int64)
    tmax = int(nr.max()) if len(rows) else 0
    if tmax == 0 or tmax > MAX_TILE_T:
        return None
    ridx = np.zeros((len(rows), tmax), np.int64)
    for j, r in enumerate(rows):
        ridx[j, :len(r)] = r
    return nr, tmax, padded_tokens(tmax), ridx


@njit_kernel
def route_parts(idx, n_experts, sx):
    """A decode step's routing as parts of one multi-GEMM: ``idx`` [T, K] expert ids ->
    ``(used, nr, ridx, kslot, sxp)``: the used experts ascending (parts 0 … J-1) plus the
    shared expert (part J, every row); ``nr`` [J+1] rows per part; ``ridx`` / ``kslot``
    [J+1, tmax] each part's token rows and routing slots in row-major ``(t, k)`` order (what
    ``np.nonzero(idx == e)`` gives), zero-padded; ``sxp`` [J+1, tmax] those rows' activation
    scales ``sx`` [T]. ``used`` is empty and ``nr[0] = -1`` when an id lies outside
    ``[0, n_experts)``."""
    T, K = idx.shape
    counts = np.zeros(n_experts, np.int64)
    for t in range(T):
        for k in range(K):
            e = idx[t, k]
            if e < 0 or e >= n_experts:
                return np.zeros(0, np.int64), np.full(1, -1, np.int64), np.zeros((1, 1), np.int64), \
                    np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32)
            counts[e] += 1
    part = np.full(n_experts, -1, np.int64)
    J = 0
    tmax = T
    for e in range(n_experts):
        if counts[e]:
            part[e] = J
            J += 1
            tmax = max(tmax, counts[e])
    used = np.empty(J, np.int64)
    for e in range(n_experts):
        if part[e] >= 0:
            used[part[e]] = e
    nr = np.zeros(J + 1, np.int64)
    ridx = np.zeros((J + 1, tmax), np.int64)
    kslot = np.zeros((J + 1, tmax), np.int64)
    sxp = np.zeros((J + 1, tmax), np.float32)
    for t in range(T):
        for k in range(K):
            j = part[idx[t, k]]
            r = nr[j]
            ridx[j, r] = t
            kslot[j, r] = k
            sxp[j, r] = sx[t]
            nr[j] = r + 1
        ridx[J, t] = t
        sxp[J, t] = sx[t]
    nr[J] = T
    return used, nr, ridx, kslot, sxp


@njit_kernel
def scatter_parts(yp, ridx, kslot, nr, J, y):
    """``y[ridx[j, r], kslot[j, r]] = yp[j, r]`` for the routed parts ``j < J``, rows
    ``r < nr[j]`` (the inverse of :func:`route_parts`)."""
    for j in range(J):
        for r in range(nr[j]):
            y[ridx[j, r], kslot[j, r]] = yp[j, r]


def multi_expert_parts(xq: np.ndarray, sel: np.ndarray, nr: np.ndarray, ridx: np.ndarray, sxp: np.ndarray,
                       st: ExpertStack, limit: float, to_bf16: bool) -> np.ndarray | None:
    """Experts ``sel[j]`` (stack slots) of stack ``st`` on token rows ``ridx[j, :nr[j]]`` of
    the quantised activations ``xq`` [T, D] int8 whose scales are ``sxp[j, :nr[j]]`` ->
    the w2 outputs ``[J, tmax, D]`` float32 (rows past ``nr[j]`` unspecified; unrounded
    dequant, as :func:`.moe._expert_raw`). None when a part has more than 16 rows or none
    has a row (the caller runs its per-expert path)."""
    J, tmax = ridx.shape
    if tmax == 0 or tmax > MAX_TILE_T:
        return None
    TP = padded_tokens(tmax)
    p13, p2, I = st.p13, st.p2, st.inter
    program = sized(_parts_program, int(nr.sum()) * 3 * I * xq.shape[1])  # the parts' multiply-adds
    return program(np.ascontiguousarray(xq), sel, nr, ridx, sxp, TP, p13.kp // 4, p13.data, p13.wsum128,
                   p13.scale, I, p2.kp // 4, p2.data, p2.wsum128, p2.scale, p2.n, np.float32(limit), to_bf16)


@njit_kernel
def stacked_moe_program(xq, sx, idx, slots, shared_slot, w13, wsum13, sw13, KG, I, w2, wsum2, sw2, KG2, N2,
                        limit, to_bf16, y):
    """A decode step's W8A8 MoE on one expert stack in one dispatch: :func:`route_parts`,
    the parts' stack slots (``slots[e]`` per routed expert, ``shared_slot`` last),
    :func:`_parts_program`, :func:`scatter_parts` into ``y`` [T, K, D]. Returns the w2
    outputs ``[J+1, tmax, D]`` (the shared expert's rows at ``[J, :T]``) and J; J = -1 (``y``
    untouched) when a used expert is not in the stack or a part exceeds one register tile
    (the caller falls back)."""
    used, nr, ridx, kslot, sxp = route_parts(idx, slots.shape[0], sx)
    J = used.shape[0]
    tmax = ridx.shape[1]
    none = np.empty((0, 0, 0), np.float32)
    if nr[0] < 0 or tmax == 0 or tmax > MAX_TILE_T:
        return none, -1
    sel = np.empty(J + 1, np.int64)
    for j in range(J):
        sel[j] = slots[used[j]]
        if sel[j] < 0:
            return none, -1
    sel[J] = shared_slot
    yp = _parts_program(np.ascontiguousarray(xq), sel, nr, ridx, sxp, PADDED_T[tmax], KG, w13, wsum13, sw13, I, KG2,
                        w2, wsum2, sw2, N2, limit, to_bf16)
    scatter_parts(yp, ridx, kslot, nr, J, y)
    return yp, J


@njit_kernel
def _parts_program(xq, sel, nr, ridx, sxp, TP, KG, w13, wsum13, sw13, I, KG2, w2, wsum2, sw2, N2, limit, to_bf16):
    """:func:`multi_expert_parts`' four kernels in one dispatch (pack the rows of every part,
    the ``[w1; w3]`` multi-GEMM, SwiGLU + requantisation, the w2 multi-GEMM), with their
    buffers; the same kernels in the same order: bitwise the four calls. ``xq`` [T, D] int8
    C-contiguous (zero-padded here to ``4·KG`` inputs when D is not)."""
    J, tmax = ridx.shape
    T, D = xq.shape
    if D == 4 * KG:
        q32 = xq.view(np.uint32)
    else:
        qp = np.zeros((T, 4 * KG), np.int8)
        qp[:, :D] = xq
        q32 = qp.view(np.uint32)
    xp = np.empty((J, 4 * KG * TP), np.uint8)
    pack_rows_parts(q32, ridx, nr, xp, TP)
    gu = np.empty((J, tmax, 2 * I), np.float32)
    rows_core(xp, sel, nr, TP, KG, w13, wsum13, sw13, 2 * I, sxp, False, gu)
    hq = np.zeros((J, TP, 4 * KG2), np.int8)
    sh = np.zeros((J, tmax), np.float32)
    xp2 = np.empty((J, 4 * KG2 * TP), np.uint8)
    _swiglu_quant_parts(gu, nr, I, limit, to_bf16, hq, sh, xp2, TP)
    y = np.empty((J, tmax, N2), np.float32)
    rows_core(xp2, sel, nr, TP, KG2, w2, wsum2, sw2, N2, sh, False, y)
    return y


def multi_expert_raw(xq: np.ndarray, sx: np.ndarray, slots: list[int], rows: list[np.ndarray],
                     st: ExpertStack, limit: float, to_bf16: bool) -> list[np.ndarray] | None:
    """Experts ``slots[j]`` of stack ``st`` on token rows ``rows[j]`` of the quantised
    activations ``xq`` [T, D] int8 / ``sx`` [T] float32 -> the w2 outputs, float32
    ``[len(rows[j]), D]`` each (unrounded dequant, as :func:`.moe._expert_raw`). None when
    a part has more than 16 rows (the caller runs its per-expert path).
    :func:`multi_expert_parts` on the rows given as lists."""
    plan = _part_rows(rows)
    if plan is None:
        return None
    nr, tmax, _, ridx = plan
    sxp = np.zeros((len(rows), tmax), np.float32)
    for j, r in enumerate(rows):
        sxp[j, :len(r)] = sx[r]
    y = multi_expert_parts(xq, np.asarray(slots, np.int64), nr, ridx, sxp, st, limit, to_bf16)
    return None if y is None else [y[j, :len(r)] for j, r in enumerate(rows)]


# --------------------------------------------------------------------------- MXFP4 experts
class MXFP4ExpertStack:
    """The stacked ``[w1; w3]`` and w2 W4A8 packs of one layer's MXFP4 routed experts:
    ``p13``, ``p2`` (:class:`..common.gemm_mxfp4.MXFP4Stack`), ``inter`` (I)."""

    __slots__ = ("inter", "p13", "p2", "w2_packs")

    def __init__(self, p13: MXFP4Stack, p2: MXFP4Stack, inter: int, w2_packs: list):
        self.p13, self.p2, self.inter = p13, p2, inter
        self.w2_packs = w2_packs  # slot -> the w2 PackedMXFP4 stacked there (identity checks)


def stack_mxfp4_experts(experts: list[tuple]) -> MXFP4ExpertStack | None:
    """Stack one layer's prepared MXFP4 experts ``(g13, p2)`` (``g13`` the
    :class:`..common.prepared.MXFP4RowsPack` of w1|w3, ``p2`` w2's
    :class:`..common.gemm_mxfp4.PackedMXFP4`) and mark each ``g13`` with ``stack`` and its
    ``slot``; None (nothing changed) when they cannot be stacked (fewer than two, mixed
    shapes, the plain ``"nk"`` layout)."""
    if len(experts) < 2:
        return None
    p13s = [g.pack for g, _ in experts]
    p2s = [p for _, p in experts]
    for ps in (p13s, p2s):
        p0 = ps[0]
        if any(p.layout != "w4" or (p.n, p.k, p.np_) != (p0.n, p0.k, p0.np_) for p in ps):
            return None
    st = MXFP4ExpertStack(stack_mxfp4(p13s), stack_mxfp4(p2s), p13s[0].n // 2, p2s)
    for i, (g, _) in enumerate(experts):
        g.stack, g.slot = st, i
    return st


@njit_kernel(parallel=True)
def _swiglu_quant_w4_parts(gu, nrows, I, limit, to_bf16, TP, xp, sx, corr):
    """Per (part j, row t < nrows[j]) of ``gu`` [J, T, 2I]: :func:`swiglu_row`, then h
    quantised per 32 inputs into part j's W4A8 operands (``xp`` [J, I·TP] int8, ``sx`` /
    ``corr`` [J, TP·I/32]; :func:`..common.gemm_mxfp4.quant_pack_w4_parts`'s layout and
    quantiser)."""
    J, T, _ = gu.shape
    NG = I // MXFP4_BLOCK
    q = np.zeros((J, TP, I), np.int8)
    for r in prange(J * T):
        buf = np.empty(I, np.float32)
        j, t, ok = _swiglu_part_row(gu, r, nrows, I, limit, to_bf16, buf)
        if ok:
            qb = np.empty(MXFP4_BLOCK, np.float32)
            quant_group_row(buf, MXFP4_BLOCK, q[j, t], sx[j, t * NG:(t + 1) * NG], corr[j, t * NG:(t + 1) * NG],
                            -ZP, qb)
    for j in prange(J):
        pack_words(q[j], xp[j].view(np.uint32), TP, np.uint32(0))


def multi_mxfp4_raw(x: np.ndarray, slots: list[int], rows: list[np.ndarray], st: MXFP4ExpertStack,
                    limit: float, to_bf16: bool) -> list[np.ndarray] | None:
    """MXFP4 experts ``slots[j]`` of stack ``st`` on token rows ``rows[j]`` of float32 ``x``
    [T, D] -> the w2 outputs, float32 ``[len(rows[j]), D]`` each, bitwise those of
    :func:`.moe._expert_raw` per expert. None when a part has more than 16 rows (the caller
    runs its per-expert path). The list form of :func:`multi_mxfp4_parts`."""
    plan = _part_rows(rows)
    if plan is None:
        return None
    nr, _, _, ridx = plan
    y = multi_mxfp4_parts(x, np.asarray(slots, np.int64), nr, ridx, st, limit, to_bf16)
    return [y[j, :len(r)] for j, r in enumerate(rows)]


def multi_mxfp4_parts(x: np.ndarray, sel: np.ndarray, nr: np.ndarray, ridx: np.ndarray, st: MXFP4ExpertStack,
                      limit: float, to_bf16: bool) -> np.ndarray | None:
    """MXFP4 experts ``sel[j]`` (stack slots, int64 [J]) of stack ``st`` on token rows
    ``ridx[j, :nr[j]]`` (int64 ``[J, >= max nr]``, e.g. the routed parts of
    :func:`route_parts`) of float32 ``x`` [T, D] -> the w2 outputs ``[J, max nr, D]`` float32
    (rows past ``nr[j]`` unspecified), each part bitwise :func:`.moe._expert_raw` of its
    expert. None when a part has more than 16 rows or none has a row (the caller runs its
    per-expert path)."""
    J = sel.shape[0]
    nr = np.ascontiguousarray(nr[:J])
    ridx = np.ascontiguousarray(ridx[:J])
    tmax = int(nr.max()) if J else 0
    if tmax == 0 or tmax > MAX_TILE_T:
        return None
    TP = padded_tokens(tmax)
    p13, p2, I = st.p13, st.p2, st.inter
    D = x.shape[1]
    xp = np.empty((J, D * TP), np.int8)
    sx = np.zeros((J, TP * (D // MXFP4_BLOCK)), np.float32)
    corr = np.zeros((J, TP * (D // MXFP4_BLOCK)), np.int32)
    quant_pack_w4_parts(x, ridx, nr, TP, xp, sx, corr)
    gu = np.empty((J, tmax, 2 * I), np.float32)
    w4_parts_core(xp, sel, nr, TP, D, p13.data, p13.np_, 2 * I, p13.sw8, sx, corr, gu)
    xp2 = np.empty((J, I * TP), np.int8)
    sx2 = np.zeros((J, TP * (I // MXFP4_BLOCK)), np.float32)
    corr2 = np.zeros((J, TP * (I // MXFP4_BLOCK)), np.int32)
    _swiglu_quant_w4_parts(gu, nr, I, np.float32(limit), to_bf16, TP, xp2, sx2, corr2)
    y = np.empty((J, tmax, p2.n), np.float32)
    w4_parts_core(xp2, sel, nr, TP, I, p2.data, p2.np_, p2.n, p2.sw8, sx2, corr2, y)
    return y
