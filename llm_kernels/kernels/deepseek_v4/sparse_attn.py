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
6-7. **output projection** (wo_a per group, then wo_b W8A8 or float):
   :mod:`.output_proj` (``grouped_output_proj``).

Whole stage (bf16, W8A8 wo_b, interleaved with the reference so caches are cold, DRAM
~80 GB/s): T=1 2.97 ms (reference 201 ms), T=8 6.0 ms (reference 180 ms); the projection
alone 2.3 / 4.1 ms for 100.7 MB of weights (44 / 25 GB/s).

Determinism: every Numba ``prange`` iteration owns its outputs and no parallel loop has a
floating-point reduction, so results are bitwise identical for any Numba thread count.
torch's bf16 bmm (oneDNN) was also bitwise stable between 1 and 2 torch threads; float32
mode's ``wo_b`` float GEMM is MKL sgemm, which is not for every row count (see the tests).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ..common.bf16 import (
    TORCH_BF16_DOT,
    f32_to_bf16_bits,
    load_f32,
    torch_bf16_as_u16,
    torch_kernel_view,
    u16_as_torch_bf16,
)
from ..common.bf16 import round_f32 as _rnd
from ..common.jit import njit_kernel, sized
from ..common.vecmath import sleef_expf as _sleef_expf
from ..common.vecmath import tree16 as _tree16
from .output_proj import WO_A_NUMBA_MAX_T, grouped_output_proj
from .stage_shared import ROW_INVARIANT_ROWS, f32_np, i64_np

__all__ = ["sparse_attn", "sparse_attn_core", "sparse_attn_core_ragged", "grouped_output_proj", "WO_A_NUMBA_MAX_T"]

#: bf16 ``bmm`` in torch's bf16 kernels (the CPU has a bf16 dot); otherwise through fp32.
#: Module-level so that the tests run the fp32 path on every CPU.
BF16_MATMUL: bool = TORCH_BF16_DOT

_DUMMY_U16 = np.zeros(1, np.uint16)
_DUMMY_F32 = np.zeros(1, np.float32)
_DUMMY_U16_3 = _DUMMY_U16.reshape(1, 1, 1)  # the unused output of a kernel with two output kinds
_DUMMY_F32_3 = _DUMMY_F32.reshape(1, 1, 1)


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


@njit_kernel
def _prep_gather(indices, N, idx, counts, pieces, starts, Wm, to_bf16, out_u16, out_f32):
    """:func:`_prep_indices` then :func:`_gather` of one pool in one dispatch (decode-sized
    calls, whose gather width ``Wm`` is the index width); returns the largest index seen."""
    mx = _prep_indices(indices, N, idx, counts) if indices.shape[1] else np.int64(-1)
    _gather(pieces, starts, idx, counts, Wm, to_bf16, out_u16, out_f32)
    return mx


# --------------------------------------------------------------------------- 2. gather
@njit_kernel(parallel=True)
def _gather(pieces, starts, idx, counts, Wm, to_bf16, out_u16, out_f32):
    """Rows ``idx[t, j]`` of the KV pool that is the concatenation of ``pieces`` (a tuple of
    ``[n_k, HD]`` arrays, read in place: pool row ``v`` is row ``v - starts[k]`` of piece
    ``k`` with ``starts[k] <= v < starts[k + 1]``) -> ``out[t, j]`` (``[T, Wm, HD]``), zeros
    for ``j >= counts[t]``; bf16 bits (RNE from float32, exact for bf16-valued input) or
    float32."""
    T = idx.shape[0]
    HD = pieces[0].shape[1]
    for i in prange(T * Wm):
        t = i // Wm
        j = i - t * Wm
        if to_bf16:
            o16 = out_u16[t, j]
            if j < counts[t]:
                v = idx[t, j]
                k = _piece_of(starts, v)
                src = pieces[k][v - starts[k]]
                for d in range(HD):
                    o16[d] = f32_to_bf16_bits(load_f32(src[d]))
            else:
                for d in range(HD):
                    o16[d] = np.uint16(0)
        else:
            o32 = out_f32[t, j]
            if j < counts[t]:
                v = idx[t, j]
                k = _piece_of(starts, v)
                src = pieces[k][v - starts[k]]
                for d in range(HD):
                    o32[d] = load_f32(src[d])
            else:
                for d in range(HD):
                    o32[d] = np.float32(0.0)


@njit_kernel
def _piece_of(starts, v):
    """The piece ``k`` holding pool row ``v``: ``starts[k] <= v < starts[k + 1]``."""
    k = 0
    while k + 2 < starts.shape[0] and v >= starts[k + 1]:
        k += 1
    return k


def _pieces(tensors) -> tuple[tuple[np.ndarray, ...], np.ndarray, int]:
    """Kernel views of a pool's pieces (one element type: float32, or bf16 bits when all are
    bf16), their start rows ``[n_pieces + 1]`` and the pool's row count."""
    ts = list(tensors)
    if not ts:
        raise ValueError("a kv pool needs at least one piece")
    if len({t.dtype for t in ts}) > 1:
        ts = [t.float() for t in ts]
    arrs = tuple(torch_kernel_view(t) for t in ts)
    ends = [0]
    for a in arrs:
        ends.append(ends[-1] + a.shape[0])
    return arrs, np.array(ends, np.int64), ends[-1]


# --------------------------------------------------------------------------- 4. softmax
@njit_kernel(parallel=True)
def _softmax_sink(s, counts, sink, scale, to_bf16, out_u16, p_u16, p_f32):
    """Softmax over each query's valid entries plus the head's sink: ``v_j = rnd(rnd(s)·scale)``
    (``s`` float32 GEMM outputs or bf16 bits; ``rnd`` of a bf16 value is itself),
    ``m = max(v, sink)``, ``e = exp(v - m)`` (SLEEF ``xexpf``), ``Σ`` summed in 16 lanes by
    the entry's **place in the query's sorted valid list** (entry j to lane ``j % 16`` in
    order, the sink — place c — last, then :func:`_tree16`; fewer than 16 terms: sequential),
    ``p_j = rnd(e_j·(1/Σ))``; padding entries get ``p = 0``. ``p`` is stored as bf16 bits in
    ``p_u16`` when ``out_u16``, else as float32 values in ``p_f32``. One (t, h) row per
    iteration, no fastmath (the summation order is the point).

    The order depends on the query's own entries only, not on where the pool keeps them
    (the reference's dense form sums by pool row, so the two can differ in the last bit of
    Σ): a row gives the same bits in a 1-row decode step and in a multi-row step whose
    other rows shift the pool (speculative decoding's verify step)."""
    T, H, Wm = s.shape
    for i in prange(T * H):
        t = i // H
        h = i - t * H
        c = counts[t]
        srow = s[t, h]
        buf = np.empty(max(c, 1), np.float32)
        sk = np.float32(sink[h])
        m = sk
        for j in range(c):
            buf[j] = _rnd(np.float32(_rnd(load_f32(srow[j]), to_bf16) * scale), to_bf16)
        for j in range(c):
            m = max(m, buf[j])
        for j in range(c):
            buf[j] = _sleef_expf(np.float32(buf[j] - m))
        esk = _sleef_expf(np.float32(sk - m))
        if c + 1 < 16:
            tot = np.float32(0.0)
            for j in range(c):
                tot = np.float32(tot + buf[j])
            tot = np.float32(tot + esk)
        else:
            lanes = np.zeros(16, np.float32)
            for j in range(c):
                ln = j & 15
                lanes[ln] = np.float32(lanes[ln] + buf[j])
            lanes[c & 15] = np.float32(lanes[c & 15] + esk)
            tot = _tree16(lanes)
        inv = np.float32(np.float32(1.0) / tot)
        if out_u16:
            prow = p_u16[t, h]
            for j in range(c):
                prow[j] = f32_to_bf16_bits(np.float32(buf[j] * inv))
            for j in range(c, Wm):
                prow[j] = np.uint16(0)
        else:
            prow32 = p_f32[t, h]
            for j in range(c):
                prow32[j] = _rnd(np.float32(buf[j] * inv), to_bf16)
            for j in range(c, Wm):
                prow32[j] = np.float32(0.0)


# --------------------------------------------------------------------------- 5. inverse RoPE
@njit_kernel(parallel=True)
def _rope_inv_round(o, cos, sin, to_bf16, out):
    """``out[t, h*HD + d]`` = rnd(o[t, h, d]) with the trailing ``2·len(cos)`` lanes rotated
    by ``-θ`` (interleaved pairs) from the rounded ``e = rnd(o[2k])``, ``o = rnd(o[2k+1])``:
    ``e' = e·c + o·s``, ``o' = o·c − e·s`` (each product rounded, no FMA, as the reference).
    ``o`` float32 GEMM outputs or bf16 bits (``rnd`` of a bf16 value is itself)."""
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
            e = _rnd(load_f32(src[nope + 2 * k]), to_bf16)
            od = _rnd(load_f32(src[nope + 2 * k + 1]), to_bf16)
            dst[nope + 2 * k] = _rnd(np.float32(np.float32(e * c) - np.float32(od * sn)), to_bf16)
            dst[nope + 2 * k + 1] = _rnd(np.float32(np.float32(od * c) + np.float32(e * sn)), to_bf16)


_f32 = f32_np  # float32 numpy view of a tensor (copy only when needed)


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
    T = q.shape[0]
    idx_in = indices.detach().to(torch.int64).contiguous().numpy()
    if idx_in.ndim != 2 or idx_in.shape[0] != T:
        raise ValueError(f"indices must be [T={T}, W], got {tuple(indices.shape)}")
    return _core(q, [(0, T, _pieces([kv_pool]), None)], idx_in, attn_sink, cos, sin, softmax_scale, dtype)


def _core(q: torch.Tensor, segs: list, idx_in: np.ndarray, attn_sink: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor, softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`sparse_attn_core` with int64 index lists ``idx_in`` [T, W] whose rows
    ``t0 … t1-1`` index the KV pool made of the pieces ``P`` (:func:`_pieces`), for each
    segment ``(t0, t1, P, seq)`` of ``segs`` (``seq``: the sequence's number in an error
    message, None for a single pool). Raises IndexError for an index past its own pool."""
    to_bf16 = dtype == torch.bfloat16
    T, H, HD = q.shape
    W = idx_in.shape[1]
    idx = np.empty((T, max(W, 1)), np.int64)
    counts = np.zeros(T, np.int64)
    via_f32 = to_bf16 and not BF16_MATMUL
    u16 = to_bf16 and not via_f32  # the gather writes bf16 bits (else float32)
    kvg_np = None
    if T <= ROW_INVARIANT_ROWS:  # decode-sized: the gather width is W, known before the index prep
        Wm = max(W, 1)
        kvg_np = np.empty((T, Wm, HD), np.uint16 if u16 else np.float32)
        o16, o32 = (kvg_np, _DUMMY_F32_3) if u16 else (_DUMMY_U16_3, kvg_np)
    for t0, t1, (pieces, starts, N), seq in segs:
        if kvg_np is not None:  # index prep and gather in one dispatch (the gather reads valid rows only)
            mx = sized(_prep_gather, (t1 - t0) * Wm * HD)(idx_in[t0:t1], N, idx[t0:t1], counts[t0:t1], pieces,
                                                          starts, Wm, u16, o16[t0:t1], o32[t0:t1]) if t1 > t0 else -1
        else:
            mx = _prep_indices(idx_in[t0:t1], N, idx[t0:t1], counts[t0:t1]) if t1 > t0 and W else -1
        if mx >= N:
            raise IndexError(f"indices reference row {mx} but kv_pool has {N} rows" if seq is None else
                             f"sequence {seq}: indices reference row {mx} but its kv pool has {N} rows")
    # Decode-sized calls gather the index lists' width, not the longest valid list of the
    # call: the PV GEMM's depth (and so its fp32 summation blocking) then depends on the
    # row's own index list only, never on the other rows. With the softmax's list-order
    # sums, a row's output is the same in a 1-row and a multi-row step (speculative
    # decoding's verify step; tested bitwise in tests/runtime/deepseek_v4/test_speculative.py).
    # Prefill-sized calls keep the longest valid list (early rows have short lists: less
    # work). Padded entries are zeros.
    # bf16 scores and PV: torch's bf16 bmm where the CPU has a bf16 dot (AVX512_BF16); on
    # other CPUs oneDNN's bf16 bmm is a scalar loop (Zen 3: 6.6 ms for one Flash-dims PV,
    # 75x its fp32 bmm), so the bf16 operands go through an fp32 bmm instead: the same exact
    # products and fp32 accumulation, one RNE rounding of each output to bf16, in the GEMM
    # library's summation order (docs/kernels.md, "bf16 matmuls without a bf16 dot").
    # 2. gather (done above for decode-sized calls)
    if kvg_np is None:
        Wm = max(int(counts.max()) if T else 0, 1)
        kvg_np = np.empty((T, Wm, HD), np.uint16 if u16 else np.float32)
        for t0, t1, (pieces, starts, _), _ in segs:  # each pool read in place, never concatenated
            if u16:
                _gather(pieces, starts, idx[t0:t1], counts[t0:t1], Wm, True, kvg_np[t0:t1], _DUMMY_F32_3)
            else:
                _gather(pieces, starts, idx[t0:t1], counts[t0:t1], Wm, False, _DUMMY_U16_3, kvg_np[t0:t1])
    if u16:
        kvg = u16_as_torch_bf16(kvg_np)
        qc = q.detach().to(torch.bfloat16)
    else:
        kvg = torch.from_numpy(kvg_np)
        qc = q if q.dtype == torch.float32 and not q.requires_grad else q.detach().float()
    # 3. scores: bf16 outputs (bf16 bmm) or float32 (the fp32 bmm: the bf16 rounding of each
    # score happens in the softmax kernel, the same RNE as a .to(bfloat16))
    s = torch.bmm(qc, kvg.transpose(1, 2))                                     # [T, H, Wm]
    sink = f32_np(attn_sink)
    # 4. softmax with sink; p as bf16 bits for the bf16 bmm, else float32 values (bf16-rounded
    # for a bf16 dtype)
    if to_bf16 and not via_f32:
        p_np = np.empty((T, H, Wm), np.uint16)
        softmax = sized(_softmax_sink, 8 * s.numel())  # (exp and the rest: ~8 operations per entry)
        softmax(torch_bf16_as_u16(s), counts, sink, np.float32(softmax_scale), True, True, p_np, _DUMMY_F32_3)
        p = u16_as_torch_bf16(p_np)
    else:
        p_np = np.empty((T, H, Wm), np.float32)
        softmax = sized(_softmax_sink, 8 * s.numel())
        softmax(s.numpy(), counts, sink, np.float32(softmax_scale), to_bf16, False, _DUMMY_U16_3, p_np)
        p = torch.from_numpy(p_np)
    # PV (float32 outputs of the fp32 bmm are rounded to bf16 by the next kernel)
    o = torch.bmm(p, kvg)                                                      # [T, H, HD]
    # 5. inverse RoPE + rounding
    x = np.empty((T, H * HD), np.float32)
    if T:
        rope_inv = sized(_rope_inv_round, o.numel())
        rope_inv(torch_kernel_view(o), _f32(cos).reshape(T, -1), _f32(sin).reshape(T, -1), to_bf16, x)
    return torch.from_numpy(x.reshape(T, H, HD))


def sparse_attn_core_ragged(q: torch.Tensor, pools: list[list[torch.Tensor]], indices: list[torch.Tensor],
                            attn_sink: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                            softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`sparse_attn_core` of a ragged batch (same contract as the reference
    ``sparse_attn_core_ragged``): sequence ``b`` owns ``indices[b].shape[0]`` consecutive rows
    of ``q`` [ΣT_b, H, HD] (and of ``cos``/``sin`` [ΣT_b, RD/2]) and attends the concatenation
    of the pieces ``pools[b]`` (each [n, HD]) through ``indices[b]`` [T_b, W_b] (-1 =
    padding). Returns o [ΣT_b, H, HD] float32 holding ``dtype``-rounded values.

    The pools are never concatenated: each sequence's rows are gathered from its pieces in
    place (a decode step used to copy the whole compressed-entry cache of every CSA/HCA
    layer). Decode-sized batches (ΣT_b <= ``ROW_INVARIANT_ROWS``) run one scores / softmax /
    PV call per index width over all their sequences. Each row's result is the one a call of
    its sequence alone gives, bit for bit: the gather follows the row's own list, the
    softmax sums in the list's order, the GEMM depth is the list width (hence one call per
    width). Larger batches (prefill) run one call per sequence. Raises ValueError for a
    ragged layout that does not add up, IndexError for an index past its own sequence's
    pool."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    if len(pools) != len(indices):
        raise ValueError(f"pools and indices need one entry per sequence, got {len(pools)} and {len(indices)}")
    idx_np, offs = [], [0]
    for ib in indices:
        a = i64_np(ib)
        if a.ndim != 2:
            raise ValueError(f"indices must be [T_b, W_b] per sequence, got {tuple(ib.shape)}")
        idx_np.append(a)
        offs.append(offs[-1] + a.shape[0])
    T = q.shape[0]
    if offs[-1] != T:
        raise ValueError(f"the sequences' index rows sum to {offs[-1]} but q has {T} rows")
    if T > ROW_INVARIANT_ROWS:
        outs = [_core(q[offs[b]:offs[b + 1]], [(0, offs[b + 1] - offs[b], _pieces(pools[b]), b)], idx_np[b], attn_sink,
                      cos[offs[b]:offs[b + 1]], sin[offs[b]:offs[b + 1]], softmax_scale, dtype)
                for b in range(len(pools))]
        return torch.cat(outs, dim=0) if outs else torch.zeros(q.shape)
    groups: dict[int, list[int]] = {}
    for b, a in enumerate(idx_np):
        groups.setdefault(a.shape[1], []).append(b)
    out = None if len(groups) == 1 else torch.empty(q.shape)
    for members in groups.values():
        segs, r0 = [], 0
        for b in members:  # the group's rows: its members' rows in member order
            n = offs[b + 1] - offs[b]
            segs.append((r0, r0 + n, _pieces(pools[b]), b))
            r0 += n
        idx = idx_np[members[0]] if len(members) == 1 else np.concatenate([idx_np[b] for b in members])
        if out is None:
            return _core(q, segs, idx, attn_sink, cos, sin, softmax_scale, dtype)
        rows = torch.cat([torch.arange(offs[b], offs[b + 1]) for b in members])
        out[rows] = _core(q[rows], segs, idx, attn_sink, cos[rows], sin[rows], softmax_scale, dtype)
    return out
