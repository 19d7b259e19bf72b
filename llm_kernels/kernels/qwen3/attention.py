"""Fused paged decode attention (flash-decoding) for Qwen3 GQA over a block-paged KV cache.

Golden: :func:`llm_kernels.reference.qwen3.attention.attention` (transformers
``eager_attention_forward``, ``models/qwen3/modeling_qwen3.py``) on the pages gathered
densely; query row ``t`` sees the first ``context_lens[t]`` tokens of its sequence (the
causal mask of multi-token steps). Per query head ``h`` (kv head ``h // g``, ``g = nq/nkv``)::

    s_j = scale · q_h · k_j   (j < context_lens[t]);   o_h = Σ_j softmax(s)_j · v_j

in float32, the output rounded once to ``dtype``.

Schedule (FlashDecoding, Dao et al. 2023). Work items are (query row, context split),
each covering **all kv heads**; the split length is a function of the problem only (never
of the thread count), so results are bitwise reproducible. An item walks its tokens in
chunks of ``_CHUNK``: a K phase (for every kv head: the scores of all g query heads of the
group at once, so each K row is read once per group, then an online-softmax step: running
max ``m``, running sum ``l``, ``alpha = exp(m_old - m_new)``) and a V phase (for every kv
head: ``acc = alpha·acc + Σ p·v``). Reading whole blocks (all heads) in address order and K
and V in separate phases streams ~15 % faster than per-head items on this machine. A
second ``prange`` (row, kv group) combines the splits' ``(m, l, acc)`` in split order.

Inner paths (same items and combine):

* **bf16 fast path** (register tiles in :mod:`.attention_tiles`; bf16 cache, ``D % 32 == 0``, AVX512_BF16, not
  ``LLM_KERNELS_FORCE_FALLBACK``) — private llvmlite intrinsics:
  ``q·k`` with ``vdpbf16ps`` in a broadcast layout (16 lanes = ``gt`` heads x ``E = 16/gt``
  bf16 pairs of q, packed once per call; the matching ``2E`` K values broadcast; 16 tokens
  = 16 independent accumulators; the E partial lanes folded while merging token vectors);
  products of bf16 values are exact in fp32 and summed in fp32 (``vdpbf16ps`` reads bf16
  denormals as 0). The softmax step is vectorised IR (``exp``: Cody-Waite + SLEEF's
  degree-6 polynomial, < 2 ulp). ``p·v`` is **fp32 FMA** (probabilities stay fp32; V
  widened in registers), 8 heads x 32 columns per register tile. Software prefetch of the
  K/V rows a few (chunk, head) units ahead is issued from inside the tiles, because a
  sequence's blocks are scattered 4 KiB pieces where the hardware prefetchers stop.
* **plain Numba** (fp32 caches, odd head dims, no AVX512_BF16, forced fallback): the same
  algorithm with auto-vectorised loops.

Numerics vs the fp32 reference: reassociated fp32 sums only (fp32 mode ~1e-6 of the value
scale; bf16 mode: the fp32 result rounded once, <= 1 bf16 ulp plus fp32 noise). In bf16
mode the fast path reads q as bf16 (exact for the bf16-valued q the contract requires).

Measured (``benchmarks/bench_qwen3_attention.py``, Qwen3-32B heads, bf16, context 4096,
random block tables, 2-core Zen 5 guest): 34-46 GB/s of K+V, i.e. 66-75 % of the DRAM
probe when it reads ~53 GB/s and 45-58 % when it reads ~85-90 GB/s (placement-dependent);
4-27x faster than gather + torch SDPA/bmm. Limits: a pure-memory probe of this access
order (scattered 4 KiB K/V pieces, all software-prefetched) streams ~43-45 GB/s when the
sequential probe reads ~53; the compute is ~17 ns per (token, kv head) per core with the
data in L2 (q·k ~5, p·v ~9.5: fp32 FMA p·v alone peaks at ~7.3), a ~60 GB/s ceiling on
2 cores. The plain path is not tuned (fp32 caches: ~5 ms, ~13 % of the roofline).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as _torch  # the wrapper's tensor checks/views only; the kernels are torch-free
from numba import prange

from ..common import jit as _jit
from ..common.bf16 import f32_bits, load_f32
from ..common.jit import njit_kernel

__all__ = ["USE_BF16_DOT", "paged_attention"]

#: bf16 caches with ``D % 32 == 0`` run the ``vdpbf16ps`` / fp32-FMA register tiles.
USE_BF16_DOT = _jit.USE_BF16

_CHUNK = 64  # tokens per online-softmax step
_PF_UNITS = 2  # software-prefetch distance in (chunk, kv head) units
_TARGET_ITEMS = 8  # work items aimed at per call (>= 2 per core; fewer = less partial traffic)
_MIN_SPLIT = 128  # shortest context split in tokens (a multiple of _CHUNK)
_MAX_SPLIT = 4096  # longest split: bounds an item's row-offset table (nkv x split x 8 B)

from .attention_tiles import (
    FASTMATH,
    NEG_INF,
    ONE,
    ZERO,
    bf16_rne,
    exp_neg,
    pv_call,
    qk_call,
    sm_call,
)


@njit_kernel
def _row_offsets(bt, sq, s0, nt, nkv, BS, D, ntp):
    """Element offsets of the K/V rows of tokens ``s0 .. s0+nt-1`` of sequence ``sq``:
    ``koff[h·ntp + c]`` for kv head h (block-table walk, no division per token), each
    head's tail up to ``ntp`` padded with its last row (tile padding and prefetch-ahead
    then read valid rows)."""
    koff = np.empty(nkv * ntp, np.int64)
    bi = s0 // BS
    r0 = s0 % BS
    c = 0
    while c < nt:
        m = min(BS - r0, nt - c)
        for h in range(nkv):
            base = ((np.int64(bt[sq, bi]) * nkv + h) * BS + r0) * D - c * D
            for j in range(c, c + m):
                koff[h * ntp + j] = base + j * D
        c += m
        r0 = 0
        bi += 1
    for h in range(nkv):
        for j in range(nt, ntp):
            koff[h * ntp + j] = koff[h * ntp + nt - 1]
    return koff


@njit_kernel(parallel=True)
def _pack_q(q, nkv, gt, qpk):
    """bf16 bits of q in the :func:`_qk16` layout, one row per (t, kv head):
    ``qpk[t·nkv + kvh, ti·gt·D + 32i + 2(hl·E + e) + j] = bf16(q[t, kvh·g + ti·gt + hl,
    2(iE + e) + j])`` (bf16 pairs moved as uint32 words)."""
    T, nq, D = q.shape
    g = nq // nkv
    E = 16 // gt
    sh = 0
    while (1 << sh) < E:
        sh += 1
    qf = q.reshape(-1)
    dst = qpk.reshape(-1).view(np.uint32)
    for th in prange(T * nkv):  # (t, kvh) rows are consecutive in q: row th covers q[th·g·D:]
        for hh in range(g):
            src = (th * g + hh) * D
            ti = hh // gt
            o = th * g * D // 2 + ti * gt * D // 2 + (hh - ti * gt) * E
            for w in range(D // 2):  # pair w -> step w >> sh, lane hl·E + (w & (E-1))
                lo = f32_bits(bf16_rne(qf[src + 2 * w])) >> np.uint32(16)
                hi = f32_bits(bf16_rne(qf[src + 2 * w + 1])) & np.uint32(0xFFFF0000)
                dst[o + (w >> sh) * 16 + (w & (E - 1))] = hi | lo


@njit_kernel(parallel=True, fastmath=FASTMATH)
def _attn_bf16_dot(qpk, kc, vc, bt, seq, items, nkv, BS, gt, D, scale, pm, pl, pacc):
    """bf16 fast path: one prange iteration per work item ``items[i] = (t, s0, s1)``
    (query row t, its tokens [s0, s1), all kv heads). Per chunk of ``_CHUNK`` tokens: K
    phase (each kv head in turn: q·k tiles, softmax step) then V phase (each kv head: p·v
    tiles), so whole blocks are read in address order and one cache array streams at a
    time; the K (V) rows of the (chunk, head) unit ``_PF_UNITS`` ahead are prefetched from
    inside the q·k (p·v) tiles. Writes the item's per-head running max, sum and
    unnormalised accumulator ``pm/pl [NI, nq]``, ``pacc [NI, nq, D]`` (p·v column order)."""
    NI = items.shape[0]
    g = qpk.shape[1] // D
    E = 16 // gt
    ntile = g // gt
    hp = min(gt, 8)
    nsteps = D // (2 * E)
    C = _CHUNK
    qpf = qpk.reshape(-1)
    contig = gt == 8 and D == 128 and BS % 16 == 0  # 16-token groups are 16 rows of one block
    for it in prange(NI):
        t = items[it, 0]
        s0 = items[it, 1]
        nt = items[it, 2] - s0
        ntp = (nt + 15) // 16 * 16 + C + 16
        koff = _row_offsets(bt, seq[t], s0, nt, nkv, BS, D, ntp)
        S = np.empty(nkv * ntile * C * 16, np.float32)  # scores / probabilities per (kv head, tile)
        st = np.empty(nkv * ntile * 48, np.float32)  # per (kv head, tile): m, l, alpha x 16 lanes
        for u in range(nkv * ntile):
            st[u * 48:u * 48 + 16] = NEG_INF
            st[u * 48 + 16:u * 48 + 32] = ZERO
        acc = pacc[it].reshape(-1)
        acc[:] = ZERO
        for c0 in range(0, nt, C):
            n = min(C, nt - c0)
            npad = (n + 15) // 16 * 16
            for phase in range(2):  # K phase (q·k + softmax, all kv heads), then V phase (p·v)
                for kvh in range(nkv):
                    kb = kvh * ntp + c0
                    u2 = kvh + _PF_UNITS  # prefetch target: the (chunk, head) unit _PF_UNITS ahead
                    c2 = c0 + (u2 // nkv) * C
                    pb = (u2 % nkv) * ntp + c2 if c2 < nt else kb
                    for ti in range(ntile):
                        So = (kvh * ntile + ti) * C * 16
                        u = (kvh * ntile + ti) * 48
                        if phase == 0:
                            qo = (t * nkv + kvh) * g * D + ti * gt * D
                            for c16 in range(0, npad, 16):
                                qk_call(gt, contig and c16 + 16 <= n, qpf, qo, kc, koff, kb + c16, pb + c16,
                                         nsteps, scale, S, So + c16 * gt)
                            sm_call(gt, S, So, n, st, u)
                        else:
                            h0 = kvh * g + ti * gt
                            for hb in range(0, gt, hp):
                                for dc in range(0, D, 32):
                                    pv_call(hp, acc, (h0 + hb) * D + dc, D, st, u + 32 + hb, S, So + hb, gt, 1,
                                             vc, koff, kb, pb, n, dc)
        for kvh in range(nkv):
            for ti in range(ntile):
                u = (kvh * ntile + ti) * 48
                for hl in range(gt):
                    pm[it, kvh * g + ti * gt + hl] = st[u + hl]
                    pl[it, kvh * g + ti * gt + hl] = st[u + 16 + hl]


@njit_kernel(fastmath=FASTMATH)
def _row_f32(cache, o, row):
    for d in range(row.size):
        row[d] = load_f32(cache[o + d])


@njit_kernel(fastmath=FASTMATH)
def _dot(x, y):
    s = ZERO
    for d in range(x.size):
        s += x[d] * y[d]
    return s


@njit_kernel(fastmath=FASTMATH)
def _axpy(a, x, y):
    for d in range(x.size):
        y[d] += a * x[d]


@njit_kernel(parallel=True, fastmath=FASTMATH)
def _attn_plain(q, kc, vc, bt, seq, items, nkv, BS, scale, pm, pl, pacc):
    """Plain-Numba path (any D, float32 or bf16-bits caches); same items and outputs as
    :func:`_attn_bf16_dot` (natural column order), one kv head after the other."""
    NI = items.shape[0]
    nq, D = q.shape[1], q.shape[2]
    g = nq // nkv
    C = _CHUNK
    for it in prange(NI):
        t = items[it, 0]
        s0 = items[it, 1]
        nt = items[it, 2] - s0
        koff = _row_offsets(bt, seq[t], s0, nt, nkv, BS, D, nt)
        row = np.empty(D, np.float32)
        S = np.empty((g, C), np.float32)  # head-major: the softmax loops run over contiguous tokens
        acc = pacc[it]
        acc[:, :] = ZERO
        for kvh in range(nkv):
            qh = q[t, kvh * g:(kvh + 1) * g]
            m = np.full(g, NEG_INF, np.float32)
            lsum = np.zeros(g, np.float32)
            ah = acc[kvh * g:(kvh + 1) * g]
            for c0 in range(0, nt, C):
                n = min(C, nt - c0)
                for c in range(n):
                    _row_f32(kc, koff[kvh * nt + c0 + c], row)
                    for h in range(g):
                        S[h, c] = _dot(qh[h], row) * scale
                for h in range(g):
                    sh = S[h]
                    mnew = m[h]
                    for c in range(n):
                        mnew = max(mnew, sh[c])
                    alpha = exp_neg(m[h] - mnew)
                    m[h] = mnew
                    ls = ZERO
                    for c in range(n):
                        sh[c] = exp_neg(sh[c] - mnew)
                        ls += sh[c]
                    lsum[h] = lsum[h] * alpha + ls
                    for d in range(D):
                        ah[h, d] *= alpha
                for c in range(n):
                    _row_f32(vc, koff[kvh * nt + c0 + c], row)
                    for h in range(g):
                        _axpy(S[h, c], row, ah[h])
            for h in range(g):
                pm[it, kvh * g + h] = m[h]
                pl[it, kvh * g + h] = lsum[h]


@njit_kernel(parallel=True, fastmath=FASTMATH)
def _combine(pm, pl, pacc, first, nsplit, g, to_bf16, perm, out):
    """``out[t, h·D + d] = rnd(Σ_s e_s·acc_s[h, d] / Σ_s e_s·l_s[h])``, ``e_s = exp(m_s[h] -
    max_s m_s[h])`` over row t's splits in order; one prange iteration per (row, group of
    g heads). ``perm``: acc columns are in the :func:`_pv32` order (see there)."""
    _, nq, D = pacc.shape
    T = out.shape[0]
    ng = nq // g
    for tg in prange(T * ng):
        t = tg // ng
        h0 = (tg % ng) * g
        i0 = first[t]
        ns = nsplit[t]
        mm = pm[i0, h0:h0 + g].copy()
        for sp in range(1, ns):
            for h in range(g):
                mm[h] = max(mm[h], pm[i0 + sp, h0 + h])
        wl = np.empty((ns, g), np.float32)
        inv = np.zeros(g, np.float32)
        for sp in range(ns):
            for h in range(g):
                wl[sp, h] = exp_neg(pm[i0 + sp, h0 + h] - mm[h])
                inv[h] += wl[sp, h] * pl[i0 + sp, h0 + h]
        for h in range(g):
            inv[h] = ONE / inv[h]
        orow = np.empty(D, np.float32)
        for h in range(g):
            a0 = pacc[i0, h0 + h]
            w0 = wl[0, h]
            for d in range(D):
                orow[d] = a0[d] * w0
            for sp in range(1, ns):
                a = pacc[i0 + sp, h0 + h]
                w = wl[sp, h]
                for d in range(D):
                    orow[d] += a[d] * w
            o = out[t, (h0 + h) * D:(h0 + h + 1) * D]
            iv = inv[h]
            for d in range(D):
                orow[d] = orow[d] * iv
                if to_bf16:
                    orow[d] = bf16_rne(orow[d])
            if perm:  # fast-path layout: per 32 columns, 16 even then 16 odd columns
                for dc in range(0, D, 32):
                    for i in range(16):
                        o[dc + 2 * i] = orow[dc + i]
                        o[dc + 2 * i + 1] = orow[dc + 16 + i]
            else:
                o[:] = orow


# --------------------------------------------------------------------------- wrapper
@njit_kernel
def _plan(bt, seq, ctx, BS, NB):
    """Validate the indices and build the work items. Returns ``(code, row, j, items,
    first, nsplit)``: ``code`` 0 = ok, 1 = seq_idx out of range, 2 = context_len < 1,
    3 = more blocks than the table row, 4 = block id outside the cache (row, table column
    j). ``items[i] = (t, s0, s1)`` ordered by (t, split); ``first``/``nsplit`` per row.
    Split length: about ``_TARGET_ITEMS`` items, >= ``_MIN_SPLIT`` tokens, a multiple of
    ``_CHUNK`` — a function of the problem only (never of the thread count)."""
    T = seq.size
    S, MB = bt.shape
    first = np.zeros(T, np.int64)
    nsplit = np.zeros(T, np.int64)
    none = np.zeros((0, 3), np.int64)
    total = 0
    for t in range(T):
        if seq[t] < 0 or seq[t] >= S:
            return 1, t, 0, none, first, nsplit
        if ctx[t] < 1:
            return 2, t, 0, none, first, nsplit
        nb = (np.int64(ctx[t]) + BS - 1) // BS
        if nb > MB:
            return 3, t, nb, none, first, nsplit
        for j in range(nb):
            if bt[seq[t], j] < 0 or bt[seq[t], j] >= NB:
                return 4, t, j, none, first, nsplit
        total += np.int64(ctx[t])
    W = (total + _TARGET_ITEMS - 1) // _TARGET_ITEMS
    W = min(_MAX_SPLIT, max(_MIN_SPLIT, (W + _CHUNK - 1) // _CHUNK * _CHUNK))
    NI = 0
    for t in range(T):
        first[t] = NI
        nsplit[t] = (np.int64(ctx[t]) + W - 1) // W
        NI += nsplit[t]
    items = np.empty((NI, 3), np.int64)
    for t in range(T):
        for sp in range(nsplit[t]):
            i = first[t] + sp
            items[i, 0] = t
            items[i, 1] = sp * W
            items[i, 2] = min((sp + 1) * W, np.int64(ctx[t]))
    return 0, 0, 0, items, first, nsplit


_INT_DTYPES = (_torch.int32, _torch.int64)


def _index_vec(x: Any, name: str, T: int) -> np.ndarray:
    if not isinstance(x, _torch.Tensor) or x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an int32/int64 torch tensor [T], got {getattr(x, 'dtype', type(x))}")
    if x.shape != (T,):
        raise ValueError(f"{name} must have shape [T={T}], got {tuple(x.shape)}")
    a = x.numpy()  # integer tensors never require grad
    return a if a.dtype == np.int32 else a.astype(np.int32)


def _cache_view(c: Any, name: str, dtype: Any, shape: Any) -> np.ndarray:
    if not isinstance(c, _torch.Tensor) or c.dim() != 4:
        raise ValueError(f"{name} must be a 4-D torch tensor [num_blocks, nkv, block_size, D], "
                         f"got {tuple(getattr(c, 'shape', ())) or type(c).__name__}")
    if c.dtype != dtype:
        raise TypeError(f"{name} dtype must be {dtype} (= dtype), got {c.dtype}")
    if shape is not None and c.shape != shape:
        raise ValueError(f"{name} shape {tuple(c.shape)} must equal k_cache's {tuple(shape)}")
    if c.requires_grad or not c.is_contiguous() or c.is_cuda:
        raise ValueError(f"{name} must be a contiguous CPU tensor without grad")
    if dtype == _torch.bfloat16:
        return c.view(_torch.int16).numpy().view(np.uint16).reshape(-1)
    return c.numpy().reshape(-1)


def paged_attention(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, seq_idx: Any,
                    context_lens: Any, scale: float, dtype: Any) -> Any:
    """Fused paged GQA decode attention (flash-decoding; see the module docstring).

    Args:
        q: ``[T, nq, D]`` float32 torch tensor holding ``dtype`` values (the output of
            :func:`..qk_norm_rope.qk_norm_rope_cache`; in bf16 mode the fast path reads q
            as bf16, exact for bf16-valued input).
        k_cache, v_cache: ``[num_blocks, nkv, block_size, D]`` contiguous CPU tensors of
            dtype ``dtype`` (float32 or bfloat16); ``nq % nkv == 0``.
        block_tables: int32/int64 ``[S, max_blocks]``: row s lists sequence s's block ids in
            token order (token j of sequence s is row ``j % block_size`` of block
            ``block_tables[s, j // block_size]``).
        seq_idx: int32/int64 ``[T]``: the sequence of each query row (``0 <= seq_idx < S``).
        context_lens: int32/int64 ``[T]``: query row t attends to tokens
            ``0 .. context_lens[t]-1`` of its sequence (expresses causal masking for
            multi-token steps), ``>= 1``.
        scale: softmax scale (``head_dim ** -0.5``).
        dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        ``[T, nq·D]`` float32 tensor holding ``dtype`` values (fp32 result rounded once).

    Raises:
        TypeError: wrong tensor types/dtypes (cache dtype != dtype, q not float32,
            non-integer index tensors).
        ValueError: bad dtype, shape mismatches, ``context_lens < 1`` or beyond the blocks
            of the table row, block ids outside the cache, ``seq_idx`` outside ``[0, S)``.
    """
    torch = _torch
    if dtype is not torch.bfloat16 and dtype is not torch.float32:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float32:
        raise TypeError(f"q must be a float32 torch tensor [T, nq, D], got {getattr(q, 'dtype', type(q))}")
    if q.dim() != 3:
        raise ValueError(f"q must have shape [T, nq, D], got {tuple(q.shape)}")
    T, nq, D = q.shape
    kc = _cache_view(k_cache, "k_cache", dtype, None)
    kshape = k_cache.shape
    vc = _cache_view(v_cache, "v_cache", dtype, kshape)
    NB, nkv, BS, Dk = kshape
    if Dk != D:
        raise ValueError(f"k_cache/v_cache head dim {Dk} must equal q's D={D}")
    if nkv < 1 or BS < 1 or nq % nkv:
        raise ValueError(f"q heads ({nq}) must be a multiple of the cache's kv heads ({nkv})")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_tables must be an int32/int64 torch tensor [S, max_blocks], "
                        f"got {getattr(block_tables, 'dtype', type(block_tables))}")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must have shape [S, max_blocks], got {tuple(block_tables.shape)}")
    bt = block_tables.numpy()
    if bt.dtype != np.int32 or not bt.flags.c_contiguous:
        bt = np.ascontiguousarray(bt, dtype=np.int32)
    seq = _index_vec(seq_idx, "seq_idx", T)
    ctx = _index_vec(context_lens, "context_lens", T)
    if T == 0:
        return torch.zeros(0, nq * D, dtype=torch.float32)
    code, r, j, items, first, nsplit = _plan(bt, seq, ctx, BS, NB)
    if code:
        S, MB = bt.shape
        if code == 1:
            raise ValueError(f"seq_idx[{r}]={int(seq[r])} must be in [0, S={S}) (rows of block_tables)")
        if code == 2:
            raise ValueError(f"context_lens[{r}]={int(ctx[r])} must be >= 1")
        if code == 3:
            raise ValueError(f"context_lens[{r}]={int(ctx[r])} needs {j} blocks of {BS} tokens but "
                             f"block_tables has {MB} per sequence")
        raise ValueError(f"block_tables[{int(seq[r])}, {j}]={int(bt[seq[r], j])} must be in "
                         f"[0, num_blocks={NB})")
    qa = (q.detach() if q.requires_grad else q).numpy()
    if not qa.flags.c_contiguous:
        qa = np.ascontiguousarray(qa)
    g = nq // nkv
    NI = items.shape[0]
    pm = np.empty((NI, nq), np.float32)
    pl = np.empty((NI, nq), np.float32)
    pacc = np.empty((NI, nq, D), np.float32)
    sc = np.float32(scale)
    if dtype == torch.bfloat16 and USE_BF16_DOT and D % 32 == 0:
        gt = 8  # heads per q·k tile: the largest power of two <= 8 dividing g
        while g % gt:
            gt //= 2
        qpk = np.empty((T * nkv, g * D), np.uint16)
        _pack_q(qa, nkv, gt, qpk)
        _attn_bf16_dot(qpk, kc, vc, bt, seq, items, nkv, BS, gt, D, sc, pm, pl, pacc)
        perm = True
    else:
        perm = False
        _attn_plain(qa, kc, vc, bt, seq, items, nkv, BS, sc, pm, pl, pacc)
    out = np.empty((T, nq * D), np.float32)
    _combine(pm, pl, pacc, first, nsplit, g, dtype == torch.bfloat16, perm, out)
    return torch.from_numpy(out)
