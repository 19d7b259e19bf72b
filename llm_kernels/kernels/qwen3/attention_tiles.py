"""Register tiles of the bf16 paged-attention fast path (``attention.paged_attention``).

llvmlite IR builders, cached per group shape, and the Numba intrinsics that call them:

* ``_qk16``: ``q·k`` scores of ``gt`` query heads x 16 tokens with ``vdpbf16ps`` on a
  broadcast layout (products of bf16 values exact in fp32, fp32 sums);
* ``_softmax16``: one online-softmax step (running max, sum, ``alpha``), ``exp`` as
  Cody-Waite + SLEEF's degree-6 polynomial (< 2 ulp);
* ``_pv32``: ``acc = alpha·acc + Σ p·v`` in fp32 FMA, 8 heads x 32 columns, V widened
  from bf16 in registers; software prefetch issued from inside the tiles.

Plus the scalar ``exp_neg`` / ``bf16_rne`` helpers the plain path shares. The schedule
and numerics are documented in :mod:`.attention`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..common.bf16 import f32_bits, f32_from_bits
from ..common.jit import njit_kernel
from ..common.x86 import BFloatType as _BFloatType
from ..common.x86 import acc_loop

FASTMATH = {"reassoc", "nsz", "contract", "arcp"}  # no nnan/ninf: -inf must stay exact

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187045e-06)
_C0, _C1, _C2, _C3, _C4, _C5 = (np.float32(c) for c in (
    0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
    0.0416664853692054748535156, 0.166666671633720397949219, 0.5))  # SLEEF xexpf
_XMIN = np.float32(-87.0)
_HALF = np.float32(0.5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
NEG_INF = np.float32(-np.inf)

# --------------------------------------------------------------------------- IR helpers
_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


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

        vecs = acc_loop(b, nsteps, [ir.Constant(_V16F, [0.0] * 16)] * 16, body, "qk")
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
    """IR twin of :func:`exp_neg` on ``<16 x float>`` (FMA polynomial)."""
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

        mx = acc_loop(b, nv, [_fconst(-np.inf)], body_max, "sm.max")[0]
        for fm in folds:
            mx = _vmax(b, mx, b.shuffle_vector(mx, mx, fm))
        m_new = _vmax(b, m_old, mx)
        alpha = _ir_exp_neg(b, b.fsub(m_old, m_new))

        def body_exp(v, cur):
            ptr, valid = lanes(v)
            p = b.select(valid, _ir_exp_neg(b, b.fsub(b.load(ptr, align=4), m_new)), _fconst(0.0))
            b.store(p, ptr, align=4)
            return [b.fadd(cur[0], p)]

        ls = acc_loop(b, nv, [_fconst(0.0)], body_exp, "sm.exp")[0]
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

        for ptr, v in zip(ptrs, acc_loop(b, n, init, body, "pv")):
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
def qk_call(gt, contig, qp, q_off, kc, koff, k0, pk0, nsteps, scale, out, out_off):
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
def sm_call(gt, S, s_off, n, st, st_off):
    if gt == 8:
        _SM8(S, s_off, n, st, st_off)
    elif gt == 4:
        _SM4(S, s_off, n, st, st_off)
    elif gt == 2:
        _SM2(S, s_off, n, st, st_off)
    else:
        _SM1(S, s_off, n, st, st_off)


@njit_kernel
def pv_call(hp, acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0):
    if hp == 8:
        _PV8(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    elif hp == 4:
        _PV4(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    elif hp == 2:
        _PV2(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)
    else:
        _PV1(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0)


# --------------------------------------------------------------------------- scalar helpers
@njit_kernel(fastmath=FASTMATH)
def exp_neg(x):
    """``exp(x)`` for float32 ``x <= 0`` (``-inf`` and ``x < -87`` give 0): Cody-Waite
    reduction by ln 2, SLEEF's degree-6 polynomial, exponent by integer add; < 2 ulp.
    Branch-free and call-free so loops over it vectorise."""
    xc = max(x, _XMIN)
    k = np.floor(xc * _LOG2E + _HALF)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    u = ((((_C0 * r + _C1) * r + _C2) * r + _C3) * r + _C4) * r + _C5
    u = u * r * r + r + ONE
    y = np.float32(u * f32_from_bits(np.uint32((np.int32(k) + np.int32(127)) << np.int32(23))))
    return y if x >= _XMIN else ZERO


@njit_kernel
def bf16_rne(x):
    """float32 -> nearest-even bf16 value as float32 (``common.bf16`` rounding, NaN kept a
    quiet NaN by a select instead of a branch so that loops over it vectorise)."""
    b = f32_bits(np.float32(x))
    r = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + ((b >> np.uint32(16)) & np.uint32(1)))
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return f32_from_bits((b | np.uint32(0x00400000) if nan else r) & np.uint32(0xFFFF0000))


# --------------------------------------------------------------------------- kernels
