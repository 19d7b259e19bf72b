"""Fused MoE stage ``moe`` (shared + routed SwiGLU experts, W8A8, group-scaled INT8, MXFP4
or float); the router is :mod:`.gate` (``gate`` is re-exported here).

Same signatures, arguments and return types as
:mod:`llm_kernels.reference.deepseek_v4.moe` (spec §10): float32 tensors holding
``dtype``-rounded values, the reference's rounding points.

``moe``
    Tokens are grouped by expert (``T <= 8`` decode: few rows per expert). W8A8 experts
    (``QuantWeight`` w1/w3/w2): the token rows are quantised once (bit-exact golden
    per-row INT8, :func:`common.quant.quant_rows`), each active expert runs

    1. ``[w1; w3]`` as one pre-packed W8A8 GEMM (:func:`common.gemm.w8a8_gemm`, exact INT32
       + the golden's fp32 dequant order) on its token rows,
    2. one Numba kernel: ``rnd`` of g and u, the ``swiglu_limit`` clamps, ``h =
       rnd(rnd(silu(g))·u)`` (torch's ``x/(1+exp(-x))`` with the SLEEF ``exp``), and the
       per-row INT8 requantisation of h (bit-exact golden recipe),
    3. the w2 W8A8 GEMM into the per-(token, slot) buffer;

    the shared expert runs the same three steps on all rows (decode-sized steps of experts
    prepared into one stack: all experts' step 1, 2 and 3 each as ONE parallel region,
    :mod:`.moe_multi`, bitwise the same), and a final Numba kernel
    combines ``rnd(Σ_k rnd(rnd(y_k)·w_k) (fp32, slot order) ) + rnd(shared)`` -> ``rnd``.
    The packed experts are prepared at load (:func:`prepare_expert`, run by
    :mod:`.prepare`); unprepared ``QuantWeight`` experts are packed for the call. Float
    experts use torch GEMMs exactly like the reference with the same
    Numba SwiGLU/combine kernels. Group-scaled INT8 (``GroupQuantWeight``) and MXFP4
    (``MXFP4Weight``, routed experts kept 4-bit) experts run the float path's steps around
    one ``[w1; w3]`` GEMM and the w2 GEMM of their kind, both quantising activations per 32
    inputs (:mod:`common.gemm_group`, the W4A8 :mod:`common.gemm_mxfp4`): bitwise the
    reference's ``numerics.linear`` (exact block sums, the goldens' fold order). A
    decode-sized step of prepared MXFP4 experts of one layer stack runs them all in one
    W4A8 region per weight (:func:`.moe_multi.multi_mxfp4_parts`, bitwise the same).

Measured (Flash dims, bf16, 2-core Zen 4 VM, DRAM ~80 GB/s by ``torch.sum``, common's
W8A8 GEMM streams at 43-46 GB/s): ``moe`` with 256 W8A8 experts, T=1 (6 routed + shared)
3.4 ms = 52 GB/s of expert weights, T=8 (40 + 1 experts) 22.9 ms = 45 GB/s; >95 % of the
time is inside ``common.gemm``'s VNNI core (Python/launch overhead per expert ~20 µs).

Numerics: the W8A8 ``moe`` path is bit-identical to the reference in the tests (exact INT8
GEMMs, same dequant order, SLEEF-identical ``exp`` in ``silu``, same rounding points, same
K-sum order); float experts differ only where torch's GEMM does.

Determinism: Numba loops own their outputs (rows / columns), no parallel float reduction,
the INT8 GEMMs are exact: bitwise equal for 1 vs 2 Numba threads. The torch calls (router
logits, float experts) are oneDNN bf16 GEMMs (thread-count independent in the tests) or,
in float32 mode, MKL sgemm, whose result depends on the torch thread count for some row
counts (observed for 5 rows) — a property of the reference's float32 path as well.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.linear import linear as _ref_linear
from ...numerics.mxfp4 import MXFP4Weight
from ...numerics.quant import QuantWeight
from ..common.bf16 import round_f32 as _rnd
from ..common.gemm import MAX_TILE_T, PackedW8A8, pack_w8a8, w8a8_gemm
from ..common.jit import njit_kernel, serial_twin, sized
from ..common.gemm_group import group_gemm_linear
from ..common.gemm_mxfp4 import mxfp4_gemm_linear
from ..common.prepared import (
    PackedGroupLinear,
    PackedMXFP4Linear,
    PackedRows,
    group_rows_pack,
    mxfp4_rows_pack,
    pack_group_rows,
    pack_mxfp4_rows,
    stage_group,
)
from ..common.quant import quant_row_f32, quant_rows, quant_rows_f32_kernel
from .moe_multi import (multi_expert_parts, multi_mxfp4_parts, route_parts, scatter_parts, stack_slots,
                        stacked_moe_program, swiglu_row)
from .gate import gate, router_logits  # noqa: F401  (the router stage, re-exported)
from .stage_shared import f32_np, i64_np

__all__ = ["ExpertPack", "expert_pack", "gate", "moe", "mxfp4_expert_packs", "pack_expert", "prepare_expert"]



# --------------------------------------------------------------------------- helpers
@njit_kernel
def _ids_in_range(idx, n):
    """True when every entry of ``idx`` [T, K] lies in [0, n)."""
    T, K = idx.shape
    for t in range(T):
        for k in range(K):
            if idx[t, k] < 0 or idx[t, k] >= n:
                return False
    return True


# --------------------------------------------------------------------------- SwiGLU kernel
@njit_kernel(parallel=True)
def _swiglu(gu, I, limit, to_bf16, do_quant, hq, sh, h):
    """Per row of ``gu`` [n, 2I] (g | u, unrounded GEMM outputs): ``g, u = rnd(.)``,
    clamps (``limit > 0``: ``g <= L``, ``-L <= u <= L``), ``h = rnd(rnd(silu(g))·u)``;
    then either the per-row INT8 quantisation of h into ``hq``/``sh`` (bit-exact golden) or
    h itself into ``h``."""
    n = gu.shape[0]
    for r in prange(n):
        buf = np.empty(I, np.float32)
        swiglu_row(gu[r], I, limit, to_bf16, buf)
        if do_quant:
            sh[r] = quant_row_f32(buf, hq[r])
        else:
            hr = h[r]
            for i in range(I):
                hr[i] = buf[i]


# --------------------------------------------------------------------------- combine kernel
@njit_kernel(parallel=True)
def _combine(y, w, ysh, to_bf16, out):
    """``out[t, d] = rnd(rnd(Σ_k rnd(rnd(y[t,k,d])·w[t,k])) + rnd(ysh[t,d]))`` with the K
    terms summed in fp32 in slot order from 0 (torch's ``per_slot.sum(dim=1)``)."""
    T, K, D = y.shape
    NB = 512
    nb = (D + NB - 1) // NB
    for i in prange(T * nb):
        t = i // nb
        d0 = (i - t * nb) * NB
        d1 = min(D, d0 + NB)
        n = d1 - d0
        o = out[t, d0:d1]  # the partial sums; loops from 0 (no index wraparound) vectorise
        for d in range(n):
            o[d] = np.float32(0.0)
        for k in range(K):
            wk = w[t, k]
            yk = y[t, k, d0:d1]
            for d in range(n):
                o[d] = np.float32(o[d] + _rnd(np.float32(_rnd(yk[d], to_bf16) * wk), to_bf16))
        sh = ysh[t, d0:d1]
        for d in range(n):
            o[d] = _rnd(np.float32(_rnd(o[d], to_bf16) + _rnd(sh[d], to_bf16)), to_bf16)


# --------------------------------------------------------------------------- packed experts
class ExpertPack:
    """The packed form of one W8A8 SwiGLU expert: ``p13`` = ``[w1; w3]`` as one ``[2I, D]``
    weight (one GEMM for the gate and up projections), ``p2`` = w2 ``[D, I]``."""

    __slots__ = ("inter", "p13", "p2", "slot", "stack")
    n_members = 3

    def __init__(self, p13: PackedW8A8, p2: PackedW8A8, inter: int):
        self.p13, self.p2, self.inter = p13, p2, inter
        self.stack, self.slot = None, -1  # set by moe_multi.stack_experts (the layer's stacked packs)


def _check_swiglu(w1, w3, w2) -> None:
    """ValueError unless w1, w3 are ``[I, D]`` and w2 ``[D, I]``."""
    I, D = w1.shape
    if tuple(w3.shape) != (I, D) or tuple(w2.shape) != (D, I):
        raise ValueError(f"expert shapes w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)} "
                         "do not form a SwiGLU expert")


def pack_expert(w1: QuantWeight, w3: QuantWeight, w2: QuantWeight) -> ExpertPack:
    """Pack one W8A8 expert (ValueError unless the shapes form a SwiGLU expert)."""
    _check_swiglu(w1, w3, w2)
    I = w1.shape[0]
    q13 = torch.cat([w1.qweight, w3.qweight], 0)
    s13 = torch.cat([w1.scale.float(), w3.scale.float()], 0)
    return ExpertPack(pack_w8a8(q13, s13), pack_w8a8(w2.qweight, w2.scale.float()), I)


def group_expert_packs(w1: GroupQuantWeight, w3: GroupQuantWeight, w2: GroupQuantWeight) -> tuple:
    """``(p13, p2)``: the packed ``[w1; w3]`` (one GEMM) and w2 of a group-scaled expert, the
    prepared ones or (unprepared weights) packed now. Raises ValueError unless the shapes
    form a SwiGLU expert."""
    _check_swiglu(w1, w3, w2)
    g = group_rows_pack((w1, w3))
    p13 = g.packed if g is not None else pack_group_rows((w1, w3))[0].group.packed
    return p13, PackedGroupLinear.of(w2).packed


def mxfp4_expert_packs(w1: MXFP4Weight, w3: MXFP4Weight, w2: MXFP4Weight) -> tuple:
    """``(p13, p2)``: the packed ``[w1; w3]`` (one W4A8 GEMM) and w2 of an MXFP4 expert
    (:class:`~.common.gemm_mxfp4.PackedMXFP4`), the prepared ones or (unprepared weights)
    packed now. Raises ValueError unless the shapes form a SwiGLU expert."""
    _check_swiglu(w1, w3, w2)
    g = mxfp4_rows_pack((w1, w3))
    p13 = g.pack if g is not None else pack_mxfp4_rows((w1, w3))[0].group.pack
    return p13, PackedMXFP4Linear.of(w2).pack


def prepare_expert(w1, w3, w2) -> tuple:
    """Load-time form of one quantised expert. W8A8 (:class:`QuantWeight`): three
    :class:`PackedRows` sharing one :class:`ExpertPack` (w1 and w3 are rows ``[0, I)`` /
    ``[I, 2I)`` of ``p13``); group-scaled (:class:`GroupQuantWeight`): w1 and w3 as two
    ``PackedGroupRows`` of one pack, w2 a ``PackedGroupLinear``; MXFP4 (:class:`MXFP4Weight`,
    kept 4-bit): w1 and w3 as two ``PackedMXFP4Rows`` of one W4A8 pack, w2 a
    ``PackedMXFP4Linear``. The raw int8 / code tensors are not referenced."""
    if isinstance(w1, MXFP4Weight):
        return (*pack_mxfp4_rows((w1, w3)), PackedMXFP4Linear.of(w2))
    if isinstance(w1, GroupQuantWeight):
        return (*pack_group_rows((w1, w3)), PackedGroupLinear.of(w2))
    if stage_group((w1, w3, w2), ExpertPack) is not None:
        return w1, w3, w2
    g = pack_expert(w1, w3, w2)
    return (PackedRows(g, 0, g.p13, w1.scale, g.inter), PackedRows(g, 1, g.p13, w3.scale, g.inter, start=g.inter),
            PackedRows(g, 2, g.p2, w2.scale, w2.shape[0]))


def expert_pack(w1: QuantWeight, w3: QuantWeight, w2: QuantWeight) -> ExpertPack:
    """The prepared :class:`ExpertPack` of an expert, or (unprepared weights) one packed
    for this call."""
    g = stage_group((w1, w3, w2), ExpertPack)
    return g if g is not None else pack_expert(w1, w3, w2)


def _is_quant(ws) -> bool:
    q = [isinstance(w, QuantWeight) for w in ws]
    if any(q) and not all(q):
        raise TypeError("an expert's w1/w3/w2 must be all QuantWeight or all float tensors")
    return q[0]


def _expert_raw(x_rows: torch.Tensor, xq: np.ndarray | None, sx: np.ndarray | None, ws, limit: float,
                to_bf16: bool, dtype: torch.dtype) -> np.ndarray:
    """One expert on its rows -> the w2 output [n, D] float32 (W8A8: unrounded dequant;
    float: the dtype-rounded linear output; ``_combine`` rounds either way)."""
    w1, w3, w2 = ws
    if isinstance(w1, (GroupQuantWeight, MXFP4Weight)):  # the float path's roundings around the GEMMs
        mx = isinstance(w1, MXFP4Weight)
        p13, p2 = mxfp4_expert_packs(w1, w3, w2) if mx else group_expert_packs(w1, w3, w2)
        gemm = mxfp4_gemm_linear if mx else group_gemm_linear
        I = w1.shape[0]
        gu = gemm(x_rows, p13).numpy()  # _swiglu rounds g and u
        n = gu.shape[0]
        h = np.empty((n, I), np.float32)
        _swiglu(gu, I, np.float32(limit), to_bf16, False, np.empty((1, 1), np.int8), np.empty(1, np.float32), h)
        return gemm(h, p2)  # _combine rounds it
    if isinstance(w1, QuantWeight):
        pk = expert_pack(w1, w3, w2)
        I = pk.inter
        gu = w8a8_gemm(xq, sx, pk.p13)
        n = gu.shape[0]
        hq = np.empty((n, I), np.int8)
        sh = np.empty(n, np.float32)
        _swiglu(gu, I, np.float32(limit), to_bf16, True, hq, sh, np.empty((1, 1), np.float32))
        return w8a8_gemm(hq, sh, pk.p2)
    g = _ref_linear(x_rows, w1, dtype)
    u = _ref_linear(x_rows, w3, dtype)
    I = g.shape[-1]
    gu = torch.cat([g, u], dim=-1).contiguous().numpy()
    n = gu.shape[0]
    h = np.empty((n, I), np.float32)
    _swiglu(gu, I, np.float32(limit), to_bf16, False, np.empty((1, 1), np.int8), np.empty(1, np.float32), h)
    return _ref_linear(torch.from_numpy(h), w2, dtype).contiguous().numpy()


def _route(idx: np.ndarray, n_experts: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The step's experts and their rows: ``used`` (ascending expert ids that ``idx`` [T, K]
    routes to) and, per used expert, ``(tok, slot)`` with ``idx[tok, slot] == e`` in row-major
    order (what ``np.nonzero(idx == e)`` gives), from one stable sort. The ids are validated
    by the caller (:func:`moe`)."""
    flat = idx.reshape(-1)
    if flat.size == 0:
        return np.zeros(0, np.int64), []
    counts = np.bincount(flat, minlength=n_experts)
    used = np.flatnonzero(counts)
    tok, slot = np.divmod(np.argsort(flat, kind="stable"), idx.shape[1])
    ends = np.cumsum(counts[used]).tolist()
    starts = [0] + ends[:-1]
    return used, [(tok[a:b], slot[a:b]) for a, b in zip(starts, ends)]


def _slot_in(ws, st) -> int:
    """Stack slot of the prepared W8A8 expert ``ws`` = (w1, w3, w2) in ``st``, else -1."""
    g = stage_group(tuple(ws), ExpertPack)
    return g.slot if g is not None and g.stack is st else -1


def _stack_plan(idx, experts, shared) -> tuple | None:
    """``(gs, st, slots)`` of a decode-sized step whose shared expert is a prepared W8A8
    expert of a stack ``st`` (``gs`` its pack, ``slots`` the routed experts' stack slots from
    :func:`.moe_multi.stack_slots`, None on a list's first sight); None otherwise."""
    T = idx.shape[0]
    gs = stage_group(tuple(shared), ExpertPack)
    st = getattr(gs, "stack", None)
    if st is None or T == 0 or T > MAX_TILE_T:  # the shared expert runs every row: a prefill never fits
        return None
    return gs, st, stack_slots(st, experts, lambda ws: _slot_in(ws, st))


def _multi_experts(xq, sx, idx, experts, plan, limit, to_bf16, y) -> np.ndarray | None:
    """The step's routed experts and the shared one through
    :func:`.moe_multi.multi_expert_parts` when all are prepared W8A8 experts of one stack
    (``plan`` from :func:`_stack_plan`): routes ``idx`` [T, K] (:func:`.moe_multi.route_parts`,
    ids already validated), fills ``y[tok, slot]`` and returns the shared expert's output
    [T, D]; None (``y`` untouched) otherwise."""
    T = idx.shape[0]
    if plan is None:
        return None
    gs, st, slots = plan
    if slots is not None:  # the engine's per-layer list: routing, both GEMMs and the scatter in one dispatch
        p13, p2 = st.p13, st.p2
        program = sized(stacked_moe_program, (idx.size + 1) * 3 * st.inter * xq.shape[1])  # the experts' MACs
        yp, J = program(xq, sx, idx, slots, gs.slot, p13.data, p13.wsum128, p13.scale, p13.kp // 4,
                        st.inter, p2.data, p2.wsum128, p2.scale, p2.kp // 4, p2.n, np.float32(limit), to_bf16, y)
        return None if J < 0 else yp[J, :T]
    used, nr, ridx, kslot, sxp = route_parts(idx, len(experts), sx)
    sel = np.empty(len(used) + 1, np.int64)
    for j, e in enumerate(used.tolist()):
        g = stage_group(tuple(experts[e]), ExpertPack)
        if g is None or g.stack is not st:
            return None
        sel[j] = g.slot
    sel[-1] = gs.slot
    yp = multi_expert_parts(xq, sel, nr, ridx, sxp, st, limit, to_bf16)
    if yp is None:
        return None
    scatter_parts(yp, ridx, kslot, nr, len(used), y)
    return yp[len(used), :T]


_quant_rows_serial = serial_twin(quant_rows_f32_kernel)
_combine_serial = serial_twin(_combine)


@njit_kernel
def _stacked_decode_program(x, w, idx, slots, shared_slot, w13, wsum13, sw13, KG, I, w2, wsum2, sw2, KG2, N2,
                            limit, to_bf16, y, out, quant_serial, combine_serial):
    """A decode step's whole W8A8 MoE on one expert stack in one dispatch: the per-token
    INT8 quantisation of ``x`` [T, D] float32 (:func:`..common.quant.quant_rows`' kernel),
    :func:`.moe_multi.stacked_moe_program` (routing, both multi-GEMMs, the scatter into
    ``y`` [T, K, D]) and :func:`_combine` of ``y``, the routing weights ``w`` [T, K] and the
    shared expert's rows into ``out`` [T, D]: the same kernels in the same order, bitwise
    the separate calls. Returns ``(xq, sx, J)``; J = -1 when the stacked program falls
    back (``y`` and ``out`` untouched; the caller runs its other path on ``xq``/``sx``).
    ``quant_serial`` / ``combine_serial``: run those two on their serial twins (what
    :func:`..common.jit.sized` picks for their own work; no parallel region for a small one
    inside a parallel program)."""
    T = x.shape[0]
    xq = np.empty(x.shape, np.int8)
    sx = np.empty(T, np.float32)
    if quant_serial:
        _quant_rows_serial(x, xq, sx)
    else:
        quant_rows_f32_kernel(x, xq, sx)
    yp, J = stacked_moe_program(xq, sx, idx, slots, shared_slot, w13, wsum13, sw13, KG, I, w2, wsum2, sw2, KG2,
                                N2, limit, to_bf16, y)
    if J >= 0:
        if combine_serial:
            _combine_serial(y, w, np.ascontiguousarray(yp[J, :T]), to_bf16, out)
        else:
            _combine(y, w, np.ascontiguousarray(yp[J, :T]), to_bf16, out)
    return xq, sx, J


def _stacked_decode(xd, weights, idx, plan, limit, to_bf16, y, out) -> tuple | None:
    """:func:`_stacked_decode_program` when the shared and routed experts are prepared W8A8
    experts of one stack with known slots (``plan`` from :func:`_stack_plan`: the engine's
    per-layer list in a decode-sized step) and ``xd`` is float32: returns ``(xq, sx, done)``
    (``done``: ``out`` holds the MoE output); None (nothing computed) otherwise."""
    if plan is None or plan[2] is None or xd.dtype != torch.float32:
        return None
    gs, st, slots = plan
    p13, p2 = st.p13, st.p2
    program = sized(_stacked_decode_program, (idx.size + 1) * 3 * st.inter * xd.shape[1])  # the experts' MACs
    xq, sx, J = program(f32_np(xd), f32_np(weights), idx, slots, gs.slot, p13.data, p13.wsum128, p13.scale,
                        p13.kp // 4, st.inter, p2.data, p2.wsum128, p2.scale, p2.kp // 4, p2.n, np.float32(limit),
                        to_bf16, y, out, sized(quant_rows_f32_kernel, xd.numel()) is not quant_rows_f32_kernel,
                        sized(_combine, y.size) is not _combine)
    return xq, sx, J >= 0


def _multi_mxfp4(xd, idx, experts, limit, to_bf16, y) -> bool:
    """The step's routed experts through :func:`.moe_multi.multi_mxfp4_parts` when all are
    prepared MXFP4 experts of one stack and no expert takes more than 16 rows: routes
    ``idx`` [T, K] (:func:`.moe_multi.route_parts`, ids already validated), fills
    ``y[tok, slot]`` and returns True; False (``y`` untouched) otherwise."""
    T = idx.shape[0]
    if idx.size == 0 or getattr(mxfp4_rows_pack(experts[int(idx[0, 0])][:2]), "stack", None) is None:
        return False  # (not a stacked MXFP4 layer: no routing pass spent)
    used, nr, ridx, kslot, _ = route_parts(idx, len(experts), np.zeros(T, np.float32))
    st = None
    sel = np.empty(len(used), np.int64)
    for j, e in enumerate(used.tolist()):
        ws = experts[e]
        g = mxfp4_rows_pack(ws[:2])
        s = getattr(g, "stack", None)
        if s is None or (st is not None and s is not st) or not isinstance(ws[2], PackedMXFP4Linear) \
                or s.w2_packs[g.slot] is not ws[2].pack:
            return False
        st = s
        sel[j] = g.slot
    if st is None:
        return False
    xf = xd if xd.dtype == torch.float32 else xd.float()
    yp = multi_mxfp4_parts(xf.contiguous().numpy(), sel, nr, ridx, st, limit, to_bf16)
    if yp is None:
        return False
    scatter_parts(yp, ridx, kslot, nr, len(used), y)
    return True


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: list[tuple[torch.Tensor, ...]],
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, swiglu_limit: float,
        dtype: torch.dtype) -> torch.Tensor:
    """Shared expert plus weighted routed experts (same contract as the reference ``moe``):
    x [T, D]; weights/indices [T, K]; experts[e] = (w1, w3, w2); shared = (w1, w3, w2).
    Returns [T, D] float32 holding ``dtype`` values."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    to_bf16 = dtype == torch.bfloat16
    T, K = indices.shape
    D = x.shape[-1]
    xd = x.detach()
    idx = i64_np(indices)
    if not _ids_in_range(idx, len(experts)):
        raise IndexError(f"expert index outside [0, {len(experts)})")
    xq = sx = None
    y = np.zeros((T, K, D), np.float32)
    ysh = None
    out = np.empty((T, D), np.float32)
    if _is_quant(shared):  # every W8A8 expert of the step in one parallel region per weight
        plan = _stack_plan(idx, experts, shared)
        r = _stacked_decode(xd, weights, idx, plan, swiglu_limit, to_bf16, y, out)
        if r is not None and r[2]:  # the whole MoE in one dispatch
            return torch.from_numpy(out)
        xq, sx = r[:2] if r is not None else quant_rows(xd if xd.dtype in (torch.float32, torch.bfloat16)
                                                       else xd.float())
        # (a decode program that fell back found an expert outside the stack: so would this)
        ysh = _multi_experts(xq, sx, idx, experts, plan, swiglu_limit, to_bf16, y) if r is None else None
    # the routed MXFP4 experts in one W4A8 region per weight
    done = ysh is not None or _multi_mxfp4(xd, idx, experts, swiglu_limit, to_bf16, y)
    used, parts = (np.zeros(0, np.int64), []) if done else _route(idx, len(experts))
    if xq is None and any(_is_quant(experts[e]) for e in used.tolist()):
        xq, sx = quant_rows(xd if xd.dtype in (torch.float32, torch.bfloat16) else xd.float())
    for e, (tok, slot) in zip(used.tolist(), parts):
        ws = experts[e]
        if isinstance(ws[0], QuantWeight):
            ye = _expert_raw(None, xq[tok], sx[tok], ws, swiglu_limit, to_bf16, dtype)
        else:
            ye = _expert_raw(xd[torch.from_numpy(tok)], None, None, ws, swiglu_limit, to_bf16, dtype)
        y[tok, slot] = ye
    if ysh is None:
        ysh = _expert_raw(xd, xq, sx, shared, swiglu_limit, to_bf16, dtype)
    if T:
        sized(_combine, y.size)(y, f32_np(weights), np.ascontiguousarray(ysh), to_bf16, out)
    return torch.from_numpy(out)
