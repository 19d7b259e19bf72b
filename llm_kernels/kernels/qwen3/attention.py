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

* **bf16 fast path** (bf16 cache, ``D % 32 == 0``, AVX512_BF16, not
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

from functools import cache
from typing import Any

import numpy as np
import torch as _torch  # the wrapper's tensor checks/views only; the kernels are torch-free
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..common import jit as _jit
from ..common.bf16 import f32_bits, f32_from_bits, load_f32
from ..common.jit import njit_kernel

__all__ = ["USE_BF16_DOT", "paged_attention"]

#: bf16 caches with ``D % 32 == 0`` run the ``vdpbf16ps`` / fp32-FMA register tiles.
USE_BF16_DOT = _jit.HAS_AVX512BF16 and not _jit.FORCE_FALLBACK

_CHUNK = 64  # tokens per online-softmax step
_PF_UNITS = 2  # software-prefetch distance in (chunk, kv head) units
_TARGET_ITEMS = 8  # work items aimed at per call (>= 2 per core; fewer = less partial traffic)
_MIN_SPLIT = 128  # shortest context split in tokens (a multiple of _CHUNK)
_MAX_SPLIT = 4096  # longest split: bounds an item's row-offset table (nkv x split x 8 B)
_FM = {"reassoc", "nsz", "contract", "arcp"}  # no nnan/ninf: -inf must stay exact

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187045e-06)
_C0, _C1, _C2, _C3, _C4, _C5 = (np.float32(c) for c in (
    0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
    0.0416664853692054748535156, 0.166666671633720397949219, 0.5))  # SLEEF xexpf
_XMIN = np.float32(-87.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_NEG_INF = np.float32(-np.inf)

# --------------------------------------------------------------------------- IR helpers
_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


class _BFloatType(ir.Type):
    """LLVM's ``bfloat`` scalar type (llvmlite has none)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloatType)

    def __hash__(self):
        return hash("bfloat")


_V32BF = ir.VectorType(_BFloatType(), 32)


def _c64(v):
    return ir.Constant(_I64, v)


def _mask(vals):
    return ir.Constant(ir.VectorType(_I32, len(vals)), list(vals))


def _fconst(v):
    return ir.Constant(_V16F, [float(np.float32(v))] * 16)


def _fn(b, name, ret, *args):
    return cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, list(args)), name)


def _ptr(context, b, aty, val, elem_off=None):
    """i8* to element ``elem_off`` (i64, optional) of a 1-D array argument."""
    p = b.bitcast(context.make_array(aty)(context, b, val).data, _I8P)
    if elem_off is None:
        return p
    return b.gep(p, [b.mul(elem_off, _c64(context.get_abi_sizeof(context.get_data_type(aty.dtype))))])


def _at(b, base, byte_off, ty):
    return b.bitcast(b.gep(base, [byte_off]), ty.as_pointer())


def _splat(b, x, vt=_V16F):
    undef = ir.Constant(vt, None)
    return b.shuffle_vector(b.insert_element(undef, x, ir.Constant(_I32, 0)), undef, _mask([0] * vt.count))


def _prefetch(b, ptr):
    b.call(_fn(b, "llvm.prefetch.p0i8", ir.VoidType(), _I8P, _I32, _I32, _I32),
           [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _loop(b, n, inits, body, name):
    """``for i in range(n)`` carrying the values ``inits``; ``body(i, cur) -> new``. Returns
    the final values (the inits when ``n <= 0``)."""
    entry = b.basic_block
    loop = b.append_basic_block(name)
    done = b.append_basic_block(name + ".done")
    b.cbranch(b.icmp_signed(">", n, _c64(0)), loop, done)
    b.position_at_end(loop)
    i = b.phi(_I64)
    i.add_incoming(_c64(0), entry)
    cur = []
    for v in inits:
        ph = b.phi(v.type)
        ph.add_incoming(v, entry)
        cur.append(ph)
    new = body(i, cur)
    i_next = b.add(i, _c64(1))
    i.add_incoming(i_next, b.basic_block)
    for ph, v in zip(cur, new):
        ph.add_incoming(v, b.basic_block)
    tail = b.basic_block
    b.cbranch(b.icmp_signed("<", i_next, n), loop, done)
    b.position_at_end(done)
    out = []
    for v0, v in zip(inits, new):
        ph = b.phi(v0.type)
        ph.add_incoming(v0, entry)
        ph.add_incoming(v, tail)
        out.append(ph)
    return out


def _arrays_ok(*pairs):
    return all(isinstance(a, types.Array) and a.dtype == dt and a.ndim == 1 for a, dt in pairs)


# --------------------------------------------------------------------------- intrinsics
def _merge_plan(gt: int) -> list:
    """Shuffle masks folding the ``E = 16/gt`` partial lanes of each head while merging
    token vectors pairwise (``shuf(X) + shuf(Y)``); after ``log2 E`` levels each of the
    ``16/E`` vectors holds E tokens x gt heads, lane ``j·gt + hl`` = (token ``E·v + j``,
    head ``hl``)."""
    E = 16 // gt
    labels = [[(c, lane // E, lane % E) for lane in range(16)] for c in range(16)]
    plan = []
    while len({lab[:2] for lab in labels[0]}) < 16:
        level, nxt = [], []
        for i in range(0, len(labels), 2):
            groups: dict = {}
            for idx, (c, h, e) in enumerate(labels[i] + labels[i + 1]):
                groups.setdefault((c, h), []).append((e, idx))
            out = []
            for (c, h), lst in groups.items():
                lst.sort()
                k = len(lst) // 2
                out += [((c, h, lst[j][0]), lst[j][1], lst[j + k][1]) for j in range(k)]
            out.sort()
            level.append(([x for _, x, _ in out], [y for _, _, y in out]))
            nxt.append([lab for lab, _, _ in out])
        plan.append(level)
        labels = nxt
    return plan


@cache
def _qk16(gt: int, dconst: int = 0):
    """Scores of 16 tokens x ``gt`` heads with ``vdpbf16ps`` (AVX512_BF16 only).

    ``qk(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)``: ``qp`` uint16 packed
    q from element ``q_off``, ``[nsteps][16 lanes][2]`` (lane ``hl·E + e`` of step ``i``:
    ``q[hl, 2(iE+e) : +2]``, ``E = 16/gt``); ``kc`` uint16 K cache (flat), token ``c < 16``
    at element ``koff[k0 + c]``. Writes ``out[out_off + c·gt + hl] = scale·q_hl·k_c``.
    Each step also prefetches E of the ``D/2`` K cache lines of the 16 rows at
    ``koff[pk0 + ...]`` (line ``l = iE + e``: row ``l % 16``, line ``l // 16``).
    ``dconst > 0``: both row sets are 16 consecutive rows of a block with head dim
    ``dconst`` (one base pointer, constant displacements)."""
    E = 16 // gt
    plan = _merge_plan(gt)

    def codegen(context, b, sig, args):
        qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off = args
        qbase = _ptr(context, b, sig.args[0], qp, q_off)
        kbase = _ptr(context, b, sig.args[2], kc)
        kop = b.bitcast(_ptr(context, b, sig.args[3], koff), _I64.as_pointer())
        row_ptr = lambda j: b.gep(kbase, [b.mul(b.load(b.gep(kop, [j])), _c64(2))])
        if dconst:
            base0 = row_ptr(k0)
            rows = [b.gep(base0, [_c64(2 * dconst * c)]) for c in range(16)]
            pbase = row_ptr(pk0)
        else:
            rows = [row_ptr(b.add(k0, _c64(c))) for c in range(16)]
        dp = _fn(b, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F, _V16F, _V32BF, _V32BF)

        def body(i, accs):
            for e in range(E):  # prefetch line l = iE + e of the later rows
                li = b.add(b.mul(i, _c64(E)), _c64(e))
                if dconst:
                    bo = b.add(b.mul(b.and_(li, _c64(15)), _c64(2 * dconst)), b.mul(b.lshr(li, _c64(4)), _c64(64)))
                    _prefetch(b, b.gep(pbase, [bo]))
                else:
                    _prefetch(b, b.gep(row_ptr(b.add(pk0, b.and_(li, _c64(15)))), [b.mul(b.lshr(li, _c64(4)), _c64(64))]))
            qv = b.load(_at(b, qbase, b.mul(i, _c64(64)), _V32BF), align=2)
            kb = b.mul(i, _c64(4 * E))
            vt = ir.VectorType(_I32, E)  # the 2E bf16 of a row, broadcast to the 16/E lane groups
            return [b.call(dp, [accs[c], qv, b.bitcast(b.shuffle_vector(
                b.load(_at(b, rows[c], kb, vt), align=2), ir.Constant(vt, None), _mask([x % E for x in range(16)])),
                _V32BF)]) for c in range(16)]

        vecs = _loop(b, nsteps, [ir.Constant(_V16F, [0.0] * 16)] * 16, body, "qk")
        for level in plan:
            vecs = [b.fadd(b.shuffle_vector(vecs[2 * j], vecs[2 * j + 1], _mask(mx)),
                           b.shuffle_vector(vecs[2 * j], vecs[2 * j + 1], _mask(my)))
                    for j, (mx, my) in enumerate(level)]
        sv = _splat(b, scale)
        obase = _ptr(context, b, sig.args[8], out, out_off)
        for v, vec in enumerate(vecs):
            b.store(b.fmul(vec, sv), _at(b, obase, _c64(64 * v), _V16F), align=4)
        return context.get_dummy_value()

    @intrinsic
    def qk(typingctx, qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off):
        if not _arrays_ok((qp, types.uint16), (kc, types.uint16), (koff, types.int64), (out, types.float32)):
            return None
        i64 = types.int64
        return types.void(qp, i64, kc, koff, i64, i64, i64, types.float32, out, i64), codegen

    return qk


def _ir_exp_neg(b, x):
    """IR twin of :func:`_exp_neg` on ``<16 x float>`` (FMA polynomial)."""
    fma = _fn(b, "llvm.fma.v16f32", _V16F, _V16F, _V16F, _V16F)
    lt = b.fcmp_ordered("<", x, _fconst(_XMIN))
    xc = b.select(lt, _fconst(_XMIN), x)
    k = b.call(_fn(b, "llvm.floor.v16f32", _V16F, _V16F), [b.call(fma, [xc, _fconst(_LOG2E), _fconst(0.5)])])
    r = b.call(fma, [k, _fconst(-_LN2_LO), b.call(fma, [k, _fconst(-_LN2_HI), xc])])
    u = _fconst(_C0)
    for cc in (_C1, _C2, _C3, _C4, _C5):
        u = b.call(fma, [u, r, _fconst(cc)])
    u = b.fadd(b.call(fma, [u, b.fmul(r, r), r]), _fconst(1.0))
    sc = b.shl(b.add(b.fptosi(k, _V16I), ir.Constant(_V16I, [127] * 16)), ir.Constant(_V16I, [23] * 16))
    return b.select(lt, _fconst(0.0), b.fmul(u, b.bitcast(sc, _V16F)))


def _vmax(b, x, y):
    return b.select(b.fcmp_ordered(">", x, y), x, y)


@cache
def _softmax16(gt: int):
    """Online-softmax step over ``n`` tokens of ``gt`` heads, scores ``S[s_off + c·gt + hl]``
    (the :func:`_qk16` layout; tokens >= n ignored). ``sm(S, s_off, n, st, st_off)``: state
    ``st[st_off:+48]`` = m, l, alpha as 16 lanes (lane ``j·gt + hl`` holds head hl's value).
    ``m' = max(m, max_c s)``, ``alpha = exp(m - m')``, ``p = exp(s - m')`` written over S (0
    for tokens >= n), ``l' = alpha·l + Σ_c p``."""
    tpv = 16 // gt
    lane_tok = ir.Constant(_V16I, [lane // gt for lane in range(16)])
    folds = [_mask([lane ^ s for lane in range(16)]) for s in (1, 2, 4, 8) if s >= gt]

    def codegen(context, b, sig, args):
        S, s_off, n, st, st_off = args
        sbase = _ptr(context, b, sig.args[0], S, s_off)
        pm, pl, pa = (_at(b, _ptr(context, b, sig.args[3], st, st_off), _c64(64 * j), _V16F) for j in range(3))
        m_old, l_old = b.load(pm, align=4), b.load(pl, align=4)
        nv = b.sdiv(b.add(n, _c64(tpv - 1)), _c64(tpv))
        n32 = _splat(b, b.trunc(n, _I32), _V16I)

        def lanes(v):
            ptr = _at(b, sbase, b.mul(v, _c64(64)), _V16F)
            valid = b.icmp_signed("<", b.add(_splat(b, b.trunc(b.mul(v, _c64(tpv)), _I32), _V16I), lane_tok), n32)
            return ptr, valid

        def body_max(v, cur):
            ptr, valid = lanes(v)
            return [_vmax(b, cur[0], b.select(valid, b.load(ptr, align=4), _fconst(-np.inf)))]

        mx = _loop(b, nv, [_fconst(-np.inf)], body_max, "sm.max")[0]
        for fm in folds:
            mx = _vmax(b, mx, b.shuffle_vector(mx, mx, fm))
        m_new = _vmax(b, m_old, mx)
        alpha = _ir_exp_neg(b, b.fsub(m_old, m_new))

        def body_exp(v, cur):
            ptr, valid = lanes(v)
            p = b.select(valid, _ir_exp_neg(b, b.fsub(b.load(ptr, align=4), m_new)), _fconst(0.0))
            b.store(p, ptr, align=4)
            return [b.fadd(cur[0], p)]

        ls = _loop(b, nv, [_fconst(0.0)], body_exp, "sm.exp")[0]
        for fm in folds:
            ls = b.fadd(ls, b.shuffle_vector(ls, ls, fm))
        b.store(m_new, pm, align=4)
        b.store(b.fadd(b.fmul(l_old, alpha), ls), pl, align=4)
        b.store(alpha, pa, align=4)
        return context.get_dummy_value()

    @intrinsic
    def sm(typingctx, S, s_off, n, st, st_off):
        if not _arrays_ok((S, types.float32), (st, types.float32)):
            return None
        return types.void(S, types.int64, types.int64, st, types.int64), codegen

    return sm


@cache
def _pv32(hp: int):
    """``acc[h, 32 cols] = alpha[h]·acc[h, :] + Σ_c p[c, h]·v_c[col0:col0+32]`` for ``hp``
    heads, fp32 FMA. The 32 bf16 of V are read as 16 words ``(v[2i], v[2i+1])``: ``word <<
    16`` is column 2i and ``word & 0xFFFF0000`` column 2i+1, so the accumulator holds the 16
    even columns, then the 16 odd ones (undone in :func:`_combine`).

    ``pv(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n,
    col0)``: head ``h`` accumulates at ``acc[acc_off + h·acc_hs:+32]``, scales by
    ``alpha[a_off + h·p_hs]``, reads ``p[p_off + c·p_cs + h·p_hs]`` and V row ``c < n`` at
    element ``voff[v0 + c] + col0`` of ``vc``. Each token step prefetches the next 32
    columns of its row and the line at ``voff[pv0 + c] + col0`` (a later unit's row)."""

    def codegen(context, b, sig, args):
        acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0 = args
        vbase = _ptr(context, b, sig.args[9], vc)
        vop = b.bitcast(_ptr(context, b, sig.args[10], voff), _I64.as_pointer())
        fma = _fn(b, "llvm.fma.v16f32", _V16F, _V16F, _V16F, _V16F)
        ptrs, init = [], []
        for h in range(hp):
            al = _splat(b, b.load(b.bitcast(_ptr(context, b, sig.args[3], alpha, b.add(a_off, b.mul(p_hs, _c64(h)))),
                                            _F32.as_pointer())))
            for half in range(2):
                ptr = _at(b, _ptr(context, b, sig.args[0], acc, b.add(acc_off, b.mul(acc_hs, _c64(h)))),
                          _c64(64 * half), _V16F)
                ptrs.append(ptr)
                init.append(b.fmul(b.load(ptr, align=4), al))

        def body(c, accs):
            po = b.add(b.load(b.gep(vop, [b.add(pv0, c)])), col0)
            _prefetch(b, b.gep(vbase, [b.mul(po, _c64(2))]))
            vo = b.add(b.load(b.gep(vop, [b.add(v0, c)])), col0)
            _prefetch(b, b.gep(vbase, [b.mul(b.add(vo, _c64(32)), _c64(2))]))
            raw = b.load(_at(b, vbase, b.mul(vo, _c64(2)), _V16I), align=2)
            halves = [b.bitcast(b.shl(raw, ir.Constant(_V16I, [16] * 16)), _V16F),
                      b.bitcast(b.and_(raw, ir.Constant(_V16I, [-65536] * 16)), _V16F)]
            prow = b.add(p_off, b.mul(c, p_cs))
            new = []
            for h in range(hp):
                pe = _ptr(context, b, sig.args[5], p, b.add(prow, b.mul(p_hs, _c64(h))))
                pb = _splat(b, b.load(b.bitcast(pe, _F32.as_pointer())))
                new += [b.call(fma, [pb, halves[k], accs[2 * h + k]]) for k in range(2)]
            return new

        for ptr, v in zip(ptrs, _loop(b, n, init, body, "pv")):
            b.store(v, ptr, align=4)
        return context.get_dummy_value()

    @intrinsic
    def pv(typingctx, acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0):
        if not _arrays_ok((acc, types.float32), (alpha, types.float32), (p, types.float32), (vc, types.uint16),
                          (voff, types.int64)):
            return None
        i64 = types.int64
        return types.void(acc, i64, i64, alpha, i64, p, i64, i64, i64, vc, voff, i64, i64, i64, i64), codegen

    return pv


_QK1, _QK2, _QK4, _QK8 = (_qk16(g) for g in (1, 2, 4, 8))
_QK8C = _qk16(8, 128)  # Qwen3: g = 8, D = 128, 16 consecutive rows of one block
_SM1, _SM2, _SM4, _SM8 = (_softmax16(g) for g in (1, 2, 4, 8))
_PV1, _PV2, _PV4, _PV8 = (_pv32(h) for h in (1, 2, 4, 8))


@njit_kernel
def _qk_call(gt, contig, qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off):
    if contig:
        _QK8C(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 8:
        _QK8(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 4:
        _QK4(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 2:
        _QK2(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)
    else:
        _QK1(qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off)


@njit_kernel
def _sm_call(gt, S, s_off, n, st, st_off):
    if gt == 8:
        _SM8(S, s_off, n, st, st_off)
    elif gt == 4:
        _SM4(S, s_off, n, st, st_off)
    elif gt == 2:
        _SM2(S, s_off, n, st, st_off)
    else:
        _SM1(S, s_off, n, st, st_off)


@njit_kernel
def _pv_call(hp, acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0):
    if hp == 8:
        _PV8(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    elif hp == 4:
        _PV4(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    elif hp == 2:
        _PV2(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    else:
        _PV1(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)


# --------------------------------------------------------------------------- scalar helpers
@njit_kernel(fastmath=_FM)
def _exp_neg(x):
    """``exp(x)`` for float32 ``x <= 0`` (``-inf`` and ``x < -87`` give 0): Cody-Waite
    reduction by ln 2, SLEEF's degree-6 polynomial, exponent by integer add; < 2 ulp.
    Branch-free and call-free so loops over it vectorise."""
    xc = max(x, _XMIN)
    k = np.floor(xc * _LOG2E + _HALF)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    u = ((((_C0 * r + _C1) * r + _C2) * r + _C3) * r + _C4) * r + _C5
    u = u * r * r + r + _ONE
    y = np.float32(u * f32_from_bits(np.uint32((np.int32(k) + np.int32(127)) << np.int32(23))))
    return y if x >= _XMIN else _ZERO


@njit_kernel
def _bf16_rne(x):
    """float32 -> nearest-even bf16 value as float32 (``common.bf16`` rounding, NaN kept a
    quiet NaN by a select instead of a branch so that loops over it vectorise)."""
    b = f32_bits(np.float32(x))
    r = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + ((b >> np.uint32(16)) & np.uint32(1)))
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return f32_from_bits((b | np.uint32(0x00400000) if nan else r) & np.uint32(0xFFFF0000))


# --------------------------------------------------------------------------- kernels
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
                lo = f32_bits(_bf16_rne(qf[src + 2 * w])) >> np.uint32(16)
                hi = f32_bits(_bf16_rne(qf[src + 2 * w + 1])) & np.uint32(0xFFFF0000)
                dst[o + (w >> sh) * 16 + (w & (E - 1))] = hi | lo


@njit_kernel(parallel=True, fastmath=_FM)
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
            st[u * 48:u * 48 + 16] = _NEG_INF
            st[u * 48 + 16:u * 48 + 32] = _ZERO
        acc = pacc[it].reshape(-1)
        acc[:] = _ZERO
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
                                _qk_call(gt, contig and c16 + 16 <= n, qpf, qo, kc, koff, kb + c16, pb + c16,
                                         nsteps, scale, S, So + c16 * gt)
                            _sm_call(gt, S, So, n, st, u)
                        else:
                            h0 = kvh * g + ti * gt
                            for hb in range(0, gt, hp):
                                for dc in range(0, D, 32):
                                    _pv_call(hp, acc, (h0 + hb) * D + dc, D, st, u + 32 + hb, S, So + hb, gt, 1,
                                             vc, koff, kb, pb, n, dc)
        for kvh in range(nkv):
            for ti in range(ntile):
                u = (kvh * ntile + ti) * 48
                for hl in range(gt):
                    pm[it, kvh * g + ti * gt + hl] = st[u + hl]
                    pl[it, kvh * g + ti * gt + hl] = st[u + 16 + hl]


@njit_kernel(fastmath=_FM)
def _row_f32(cache, o, row):
    for d in range(row.size):
        row[d] = load_f32(cache[o + d])


@njit_kernel(fastmath=_FM)
def _dot(x, y):
    s = _ZERO
    for d in range(x.size):
        s += x[d] * y[d]
    return s


@njit_kernel(fastmath=_FM)
def _axpy(a, x, y):
    for d in range(x.size):
        y[d] += a * x[d]


@njit_kernel(parallel=True, fastmath=_FM)
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
        acc[:, :] = _ZERO
        for kvh in range(nkv):
            qh = q[t, kvh * g:(kvh + 1) * g]
            m = np.full(g, _NEG_INF, np.float32)
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
                    alpha = _exp_neg(m[h] - mnew)
                    m[h] = mnew
                    ls = _ZERO
                    for c in range(n):
                        sh[c] = _exp_neg(sh[c] - mnew)
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


@njit_kernel(parallel=True, fastmath=_FM)
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
                wl[sp, h] = _exp_neg(pm[i0 + sp, h0 + h] - mm[h])
                inv[h] += wl[sp, h] * pl[i0 + sp, h0 + h]
        for h in range(g):
            inv[h] = _ONE / inv[h]
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
                    orow[d] = _bf16_rne(orow[d])
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
