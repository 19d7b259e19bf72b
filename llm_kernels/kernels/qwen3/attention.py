"""Fused paged decode attention (flash-decoding) for Qwen3 GQA over a block-paged KV cache.

Golden: :func:`llm_kernels.reference.qwen3.attention.attention` (transformers
``eager_attention_forward`` of ``models/qwen3/modeling_qwen3.py``) on the K/V gathered
densely from the pages, with the causal mask expressed as "query row ``t`` sees the first
``context_lens[t]`` tokens of its sequence". Formula per query head ``h`` (kv head
``h // g``, ``g = nq / nkv``)::

    s_j = scale · q_h · k_j            for j < context_lens[t]
    o_h = Σ_j softmax(s)_j · v_j        (float32 throughout, output rounded once to dtype)

Schedule (FlashDecoding, Dao et al. 2023): one ``prange`` work item per (query row, kv
head, context split). An item streams its K and V rows once, in chunks of ``_CHUNK``
tokens, computing the scores of **all g query heads of the group together** (each K/V
row is read once per group), and keeps an online softmax per head (running max ``m``,
running sum ``l``, accumulator rescaled by ``exp(m_old - m_new)`` once per chunk). The
split length depends only on the problem size (never on the thread count), so results
are bitwise identical across calls and thread counts; a second ``prange`` over (row, kv
head) combines the splits' ``(m, l, acc)`` in split order and rounds to dtype.

Two inner paths (same work items, same combine):

* **bf16 fast path** (bf16 cache, ``D % 32 == 0``, AVX512_BF16, not
  ``LLM_KERNELS_FORCE_FALLBACK``): two private llvmlite intrinsics.
  ``q·k`` uses ``vdpbf16ps`` in the broadcast layout: a zmm holds 16 lanes = ``gt`` heads
  x ``E = 16/gt`` consecutive bf16 pairs of q (packed once per item), the matching
  ``2E`` bf16 values of one K row are broadcast to every lane, 16 tokens per register tile
  (16 independent accumulators), then the E partial lanes are folded by a shuffle tree.
  Products of bf16 values are exact in fp32; accumulation is fp32 in a fixed order
  (``vdpbf16ps`` reads bf16 denormals as zero — irrelevant at fp32 tolerance). ``p·v``
  is **fp32 FMA** (probabilities stay fp32; the bf16 V values are widened in registers
  by ``uint32(u16) << 16``), 8 heads x 32 columns of accumulators per register tile.
* **plain Numba** (fp32 caches, odd head dims, CPUs without AVX512_BF16, forced
  fallback): the same algorithm with auto-vectorised loops over D.

``exp`` is a Cody-Waite + degree-6 polynomial (SLEEF ``expf`` constants, < 2 ulp), written
so that LLVM vectorises it. Numerics vs the fp32 reference: reassociated fp32 sums only
(float32 mode: ~1e-6 relative; bf16 mode: the fp32 result rounded once, so <= 1 bf16 ulp
plus fp32 noise from the reference's own fp32 result).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..common import jit as _jit
from ..common.bf16 import f32_bits, f32_from_bits, load_f32
from ..common.jit import njit_kernel

__all__ = ["paged_attention", "USE_BF16_DOT"]

#: bf16 caches with ``D % 32 == 0`` run the ``vdpbf16ps`` / fp32-FMA register tiles.
USE_BF16_DOT = _jit.HAS_AVX512BF16 and not _jit.FORCE_FALLBACK

_PF_LOC = 3  # llvm.prefetch locality (3: prefetcht0)
_PF_UNITS = 2  # software prefetch distance in (chunk, kv head) units
_PV_NEAR = 1
_CHUNK = 32  # tokens per online-softmax step (scores scratch 32 x 16 floats per head tile)
_TARGET_ITEMS = 8  # work items aimed at per call (>= 2 per core; fewer = less partial-result traffic)
_MIN_SPLIT = 128  # shortest context split, tokens (amortises the per-item setup and combine)

# fastmath without nnan/ninf (so -inf stays exact) for the vectorised reductions
_FM = {"reassoc", "nsz", "contract", "arcp"}

_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
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


def _data_ptr(context, builder, aty, val):
    return builder.bitcast(context.make_array(aty)(context, builder, val).data, _I8P)


def _at(builder, base, byte_off, ty):
    return builder.bitcast(builder.gep(base, [byte_off]), ty.as_pointer())


def _c64(v):
    return ir.Constant(_I64, v)


def _mask(vals):
    return ir.Constant(ir.VectorType(_I32, len(vals)), list(vals))


# --------------------------------------------------------------------------- scalar helpers
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187045e-06)
_EXP_C = (np.float32(0.000198527617612853646278381), np.float32(0.00139304355252534151077271),
          np.float32(0.00833336077630519866943359), np.float32(0.0416664853692054748535156),
          np.float32(0.166666671633720397949219), np.float32(0.5))
_C0, _C1, _C2, _C3, _C4, _C5 = _EXP_C
_XMIN = np.float32(-87.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_NEG_INF = np.float32(-np.inf)


# --------------------------------------------------------------------------- intrinsics
def _splat(builder, x, vt=_V16F):
    undef = ir.Constant(vt, None)
    return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(_I32, 0)), undef,
                                  _mask([0] * vt.count))


def _fconst(v):
    return ir.Constant(_V16F, [float(np.float32(v))] * 16)


def _merge_plan(gt: int) -> list[list[tuple[list[int], list[int]]]]:
    """Shuffle masks folding the ``E = 16/gt`` partial lanes of each head while merging
    token vectors: level by level, vectors ``(2i, 2i+1)`` become ``shuf(X) + shuf(Y)``;
    after ``log2 E`` levels each of the ``16/E`` vectors holds ``E`` tokens x ``gt`` heads,
    lane ``j·gt + hl`` = token ``E·v + j``, head ``hl`` (token-major, head-minor)."""
    E = 16 // gt
    labels = [[(c, lane // E, lane % E) for lane in range(16)] for c in range(16)]
    plan = []
    while len(labels[0]) and len({lab[:2] for lab in labels[0]}) < 16:
        level, nxt = [], []
        for i in range(0, len(labels), 2):
            ent = labels[i] + labels[i + 1]
            groups: dict = {}
            for idx, (c, h, e) in enumerate(ent):
                groups.setdefault((c, h), []).append((e, idx))
            out = []
            for (c, h), lst in groups.items():
                lst.sort()
                k = len(lst) // 2
                for j in range(k):
                    out.append(((c, h, lst[j][0]), lst[j][1], lst[j + k][1]))
            out.sort()
            level.append(([ix for _, ix, _ in out], [iy for _, _, iy in out]))
            nxt.append([lab for lab, _, _ in out])
        plan.append(level)
        labels = nxt
    return plan


@lru_cache(maxsize=None)
def _qk16(gt: int, dconst: int = 0):
    """Scores of 16 tokens x ``gt`` heads with ``vdpbf16ps`` (AVX512_BF16 only).

    ``qk(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)``: ``qp`` uint16
    packed q ``[nsteps][16 lanes][2]`` from element ``q_off`` (lane ``hl·E + e`` of step
    ``i`` holds ``q[hl, 2(iE+e)], q[hl, 2(iE+e)+1]``, ``E = 16/gt``); ``kc``/``vc`` uint16
    K/V caches (flat); token ``c < 16`` has its K row at element ``koff[k0 + c]``. Writes
    ``out[out_off + c·gt + hl] = scale · Σ_d q[hl, d]·k_c[d]`` (16·gt floats).

    Each step also prefetches E cache lines of K and E of V of the 16 rows at
    ``koff[pk0 + 0..15]`` (line ``l = iE + e``: row ``l % 16``, line ``l // 16``), so the
    ``D/2`` lines of each cache for those rows are requested evenly over the ``D/(2E)``
    steps, interleaved with the dot products.

    ``dconst > 0``: the 16 rows (and the 16 prefetch rows) are consecutive rows of one
    block with head dim ``dconst`` (``koff[k0 + c] = koff[k0] + c·dconst``), so one base
    pointer with constant displacements replaces the 16 row pointers."""
    E = 16 // gt
    plan = _merge_plan(gt)

    def codegen(context, builder, sig, args):
        qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off = args
        qbase = builder.gep(_data_ptr(context, builder, sig.args[0], qp), [builder.mul(q_off, _c64(2))])
        kbase = _data_ptr(context, builder, sig.args[2], kc)
        vbase = _data_ptr(context, builder, sig.args[3], vc)
        obase = _data_ptr(context, builder, sig.args[9], out)
        kop = builder.bitcast(_data_ptr(context, builder, sig.args[4], koff), _I64.as_pointer())
        pff = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), "llvm.prefetch.p0i8")
        rows = []
        if dconst:
            base0 = builder.gep(kbase, [builder.mul(builder.load(builder.gep(kop, [k0])), _c64(2))])
            pbase0 = builder.gep(kbase, [builder.mul(builder.load(builder.gep(kop, [pk0])), _c64(2))])
            rows = [builder.gep(base0, [_c64(2 * dconst * c)]) for c in range(16)]
        else:
            for c in range(16):
                off = builder.load(builder.gep(kop, [builder.add(k0, _c64(c))]))
                rows.append(builder.gep(kbase, [builder.mul(off, _c64(2))]))
        dp = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]), "llvm.x86.avx512bf16.dpbf16ps.512")
        zero = ir.Constant(_V16F, [0.0] * 16)
        entry = builder.basic_block
        loop = builder.append_basic_block("qk.loop")
        done = builder.append_basic_block("qk.done")
        builder.cbranch(builder.icmp_signed(">", nsteps, _c64(0)), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(_I64)
        i.add_incoming(_c64(0), entry)
        accs = []
        for _ in range(16):
            ph = builder.phi(_V16F)
            ph.add_incoming(zero, entry)
            accs.append(ph)
        for e in range(E):  # prefetch line l = iE + e: row l & 15, line l >> 4 (64 B = 32 elements)
            li = builder.add(builder.mul(i, _c64(E)), _c64(e))
            if dconst:
                bo = builder.add(builder.mul(builder.and_(li, _c64(15)), _c64(2 * dconst)),
                                 builder.mul(builder.lshr(li, _c64(4)), _c64(64)))
                pptr = builder.gep(pbase0, [bo])
            else:
                row = builder.add(pk0, builder.and_(li, _c64(15)))
                eo = builder.add(builder.load(builder.gep(kop, [row])),
                                 builder.mul(builder.lshr(li, _c64(4)), _c64(32)))
                pptr = builder.gep(kbase, [builder.mul(eo, _c64(2))])
            builder.call(pff, [pptr, ir.Constant(_I32, 0), ir.Constant(_I32, _PF_LOC), ir.Constant(_I32, 1)])
        qv = builder.load(_at(builder, qbase, builder.mul(i, _c64(64)), _V32BF), align=2)
        kb = builder.mul(i, _c64(4 * E))
        new = []
        for c in range(16):
            if E == 16:
                w = builder.load(_at(builder, rows[c], kb, _V16I), align=2)
            elif E == 1:
                w = _splat(builder, builder.load(_at(builder, rows[c], kb, _I32), align=2), _V16I)
            else:
                vt = ir.VectorType(_I32, E)
                w = builder.shuffle_vector(builder.load(_at(builder, rows[c], kb, vt), align=2),
                                           ir.Constant(vt, None), _mask([lane % E for lane in range(16)]))
            new.append(builder.call(dp, [accs[c], qv, builder.bitcast(w, _V32BF)]))
        i_next = builder.add(i, _c64(1))
        i.add_incoming(i_next, loop)
        for c in range(16):
            accs[c].add_incoming(new[c], loop)
        builder.cbranch(builder.icmp_signed("<", i_next, nsteps), loop, done)
        builder.position_at_end(done)
        vecs = []
        for c in range(16):
            ph = builder.phi(_V16F)
            ph.add_incoming(zero, entry)
            ph.add_incoming(new[c], loop)
            vecs.append(ph)
        for level in plan:
            vecs = [builder.fadd(builder.shuffle_vector(vecs[2 * j], vecs[2 * j + 1], _mask(mx)),
                                 builder.shuffle_vector(vecs[2 * j], vecs[2 * j + 1], _mask(my)))
                    for j, (mx, my) in enumerate(level)]
        sv = _splat(builder, scale)
        for v, vec in enumerate(vecs):
            ob = builder.mul(builder.add(out_off, _c64(16 * v)), _c64(4))
            builder.store(builder.fmul(vec, sv), _at(builder, obase, ob, _V16F), align=4)
        return context.get_dummy_value()

    @intrinsic
    def qk(typingctx, qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off):
        for a, dt in ((qp, types.uint16), (kc, types.uint16), (vc, types.uint16), (koff, types.int64),
                      (out, types.float32)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        i64 = types.int64
        sig = types.void(qp, i64, kc, vc, koff, i64, i64, i64, types.float32, out, i64)
        return sig, codegen

    return qk


def _ir_exp_neg(builder, x):
    """IR twin of :func:`_exp_neg` on ``<16 x float>`` (FMA polynomial)."""
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F]), "llvm.floor.v16f32")
    lt = builder.fcmp_ordered("<", x, _fconst(_XMIN))
    xc = builder.select(lt, _fconst(_XMIN), x)
    k = builder.call(floor, [builder.call(fma, [xc, _fconst(_LOG2E), _fconst(0.5)])])
    r = builder.call(fma, [k, _fconst(-_LN2_HI), xc])
    r = builder.call(fma, [k, _fconst(-_LN2_LO), r])
    u = _fconst(_C0)
    for cc in (_C1, _C2, _C3, _C4, _C5):
        u = builder.call(fma, [u, r, _fconst(cc)])
    u = builder.fadd(builder.call(fma, [u, builder.fmul(r, r), r]), _fconst(1.0))
    ki = builder.fptosi(k, _V16I)
    sc = builder.bitcast(builder.shl(builder.add(ki, ir.Constant(_V16I, [127] * 16)),
                                     ir.Constant(_V16I, [23] * 16)), _V16F)
    return builder.select(lt, _fconst(0.0), builder.fmul(u, sc))


def _vmax(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@lru_cache(maxsize=None)
def _softmax16(gt: int):
    """Online-softmax step over ``n`` tokens of ``gt`` heads, scores ``S[s_off + c·gt + hl]``
    (the :func:`_qk16` layout, tokens >= n ignored).

    ``sm(S, s_off, n, st, st_off)``; state ``st[st_off:+48]`` = m, l, alpha as 16 lanes
    (lane ``j·gt + hl`` holds head hl's value for every j). Updates
    ``m' = max(m, max_c s)``, ``alpha = exp(m - m')``, ``p = exp(s - m')`` (written over S,
    0 for tokens >= n), ``l' = alpha·l + Σ_c p``."""
    tpv = 16 // gt
    lane_tok = ir.Constant(_V16I, [lane // gt for lane in range(16)])
    folds = []
    sft = gt
    while sft < 16:
        folds.append(_mask([lane ^ sft for lane in range(16)]))
        sft *= 2

    def codegen(context, builder, sig, args):
        S, s_off, n, st, st_off = args
        sbase = _data_ptr(context, builder, sig.args[0], S)
        stb = _data_ptr(context, builder, sig.args[3], st)
        ptr_m, ptr_l, ptr_a = (_at(builder, stb, builder.mul(builder.add(st_off, _c64(16 * j)), _c64(4)), _V16F)
                               for j in range(3))
        m_old = builder.load(ptr_m, align=4)
        l_old = builder.load(ptr_l, align=4)
        nv = builder.sdiv(builder.add(n, _c64(tpv - 1)), _c64(tpv))
        n32 = _splat(builder, builder.trunc(n, _I32), _V16I)
        ninf = _fconst(-np.inf)

        def vec_loop(name, init, body):
            entry = builder.basic_block
            loop = builder.append_basic_block(name)
            done = builder.append_basic_block(name + ".done")
            builder.cbranch(builder.icmp_signed(">", nv, _c64(0)), loop, done)
            builder.position_at_end(loop)
            v = builder.phi(_I64)
            v.add_incoming(_c64(0), entry)
            cur = builder.phi(_V16F)
            cur.add_incoming(init, entry)
            ptr = _at(builder, sbase, builder.mul(builder.add(s_off, builder.mul(v, _c64(16))), _c64(4)), _V16F)
            tok = builder.add(_splat(builder, builder.trunc(builder.mul(v, _c64(tpv)), _I32), _V16I), lane_tok)
            valid = builder.icmp_signed("<", tok, n32)
            nxt = body(ptr, valid, cur)
            v_next = builder.add(v, _c64(1))
            v.add_incoming(v_next, loop)
            cur.add_incoming(nxt, loop)
            builder.cbranch(builder.icmp_signed("<", v_next, nv), loop, done)
            builder.position_at_end(done)
            res = builder.phi(_V16F)
            res.add_incoming(init, entry)
            res.add_incoming(nxt, loop)
            return res

        def body_max(ptr, valid, cur):
            return _vmax(builder, cur, builder.select(valid, builder.load(ptr, align=4), ninf))

        mx = vec_loop("sm.max", ninf, body_max)
        for fm in folds:
            mx = _vmax(builder, mx, builder.shuffle_vector(mx, mx, fm))
        m_new = _vmax(builder, m_old, mx)
        alpha = _ir_exp_neg(builder, builder.fsub(m_old, m_new))

        def body_exp(ptr, valid, cur):
            p = _ir_exp_neg(builder, builder.fsub(builder.load(ptr, align=4), m_new))
            p = builder.select(valid, p, _fconst(0.0))
            builder.store(p, ptr, align=4)
            return builder.fadd(cur, p)

        ls = vec_loop("sm.exp", _fconst(0.0), body_exp)
        for fm in folds:
            ls = builder.fadd(ls, builder.shuffle_vector(ls, ls, fm))
        builder.store(m_new, ptr_m, align=4)
        builder.store(builder.fadd(builder.fmul(l_old, alpha), ls), ptr_l, align=4)
        builder.store(alpha, ptr_a, align=4)
        return context.get_dummy_value()

    @intrinsic
    def sm(typingctx, S, s_off, n, st, st_off):
        for a in (S, st):
            if not isinstance(a, types.Array) or a.dtype != types.float32 or a.ndim != 1:
                return None
        return types.void(S, types.int64, types.int64, st, types.int64), codegen

    return sm


@lru_cache(maxsize=None)
def _pv32(hp: int):
    """``acc[h, 32 cols] = alpha[h]·acc[h, :] + Σ_c p[c, h]·v_c[col0:col0+32]`` for ``hp``
    heads, fp32 FMA, bf16 V widened in registers: the 32 bf16 are read as 16 uint32 words
    ``(v[2i], v[2i+1])``, ``word << 16`` is column 2i and ``word & 0xFFFF0000`` column 2i+1,
    so the accumulator holds the 16 even columns, then the 16 odd ones (undone in
    :func:`_combine`).

    ``pv(acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n,
    col0)``: head ``h < hp`` accumulates at ``acc[acc_off + h·acc_hs:+32]``, scales by
    ``alpha[a_off + h·p_hs]``, reads ``p[p_off + c·p_cs + h·p_hs]`` for ``c < n``, and the V
    row of token ``c`` at element ``voff[v0 + c] + col0`` of ``vc`` (uint16, flat); each
    token step also prefetches the line at ``voff[pv0 + c] + col0`` (a later unit's row)."""

    def codegen(context, builder, sig, args):
        acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0 = args
        vop = builder.gep(builder.bitcast(_data_ptr(context, builder, sig.args[10], voff), _I64.as_pointer()), [v0])
        pvop = builder.gep(builder.bitcast(_data_ptr(context, builder, sig.args[10], voff), _I64.as_pointer()), [pv0])
        pff = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), "llvm.prefetch.p0i8")
        abase = _data_ptr(context, builder, sig.args[0], acc)
        albase = _data_ptr(context, builder, sig.args[3], alpha)
        pbase = _data_ptr(context, builder, sig.args[5], p)
        vbase = _data_ptr(context, builder, sig.args[9], vc)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
        undef16 = ir.Constant(_V16F, None)

        def splat(x):
            return builder.shuffle_vector(builder.insert_element(undef16, x, ir.Constant(_I32, 0)), undef16,
                                          _mask([0] * 16))

        aptrs, init = [], []
        for h in range(hp):
            ab = builder.mul(builder.add(acc_off, builder.mul(acc_hs, _c64(h))), _c64(4))
            al = builder.load(_at(builder, albase, builder.mul(builder.add(a_off, builder.mul(p_hs, _c64(h))),
                                                               _c64(4)), _F32))
            alv = splat(al)
            for half in range(2):
                ptr = _at(builder, abase, builder.add(ab, _c64(64 * half)), _V16F)
                aptrs.append(ptr)
                init.append(builder.fmul(builder.load(ptr, align=4), alv))
        entry = builder.basic_block
        loop = builder.append_basic_block("pv.loop")
        done = builder.append_basic_block("pv.done")
        builder.cbranch(builder.icmp_signed(">", n, _c64(0)), loop, done)
        builder.position_at_end(loop)
        c = builder.phi(_I64)
        c.add_incoming(_c64(0), entry)
        accs = []
        for v0 in init:
            ph = builder.phi(_V16F)
            ph.add_incoming(v0, entry)
            accs.append(ph)
        po = builder.add(builder.load(builder.gep(pvop, [c])), col0)
        builder.call(pff, [builder.gep(vbase, [builder.mul(po, _c64(2))]), ir.Constant(_I32, 0), ir.Constant(_I32, _PF_LOC),
                           ir.Constant(_I32, 1)])
        vo = builder.add(builder.load(builder.gep(vop, [c])), col0)
        if _PV_NEAR:
            builder.call(pff, [builder.gep(vbase, [builder.mul(builder.add(vo, _c64(32)), _c64(2))]),
                               ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        raw = builder.load(_at(builder, vbase, builder.mul(vo, _c64(2)), _V16I), align=2)
        # word i = (v[2i], v[2i+1]): even columns = word << 16, odd = word & 0xFFFF0000
        halves = [builder.bitcast(builder.shl(raw, ir.Constant(_V16I, [16] * 16)), _V16F),
                  builder.bitcast(builder.and_(raw, ir.Constant(_V16I, [-65536] * 16)), _V16F)]
        prow = builder.add(p_off, builder.mul(c, p_cs))
        new = []
        for h in range(hp):
            pv = builder.load(_at(builder, pbase, builder.mul(builder.add(prow, builder.mul(p_hs, _c64(h))),
                                                              _c64(4)), _F32))
            pb = splat(pv)
            for half in range(2):
                new.append(builder.call(fma, [pb, halves[half], accs[2 * h + half]]))
        c_next = builder.add(c, _c64(1))
        c.add_incoming(c_next, loop)
        for a, v in zip(accs, new):
            a.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", c_next, n), loop, done)
        builder.position_at_end(done)
        finals = []
        for k in range(len(aptrs)):
            ph = builder.phi(_V16F)
            ph.add_incoming(init[k], entry)
            ph.add_incoming(new[k], loop)
            finals.append(ph)
        for ph, ptr in zip(finals, aptrs):
            builder.store(ph, ptr, align=4)
        return context.get_dummy_value()

    @intrinsic
    def pv(typingctx, acc, acc_off, acc_hs, alpha, a_off, p, p_off, p_cs, p_hs, vc, voff, v0, pv0, n, col0):
        for a, dt in ((acc, types.float32), (alpha, types.float32), (p, types.float32), (vc, types.uint16),
                      (voff, types.int64)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        i64 = types.int64
        sig = types.void(acc, i64, i64, alpha, i64, p, i64, i64, i64, vc, voff, i64, i64, i64, i64)
        return sig, codegen

    return pv


@intrinsic
def _pf(typingctx, arr, off):
    """Software prefetch (``prefetcht0``) of the cache line holding ``arr[off]`` (1-D)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(off, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        a, o = args
        item = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        base = _data_ptr(context, builder, sig.args[0], a)
        ptr = builder.gep(base, [builder.mul(builder.sext(o, _I64) if o.type.width < 64 else o, _c64(item))])
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, off), codegen


_QK1, _QK2, _QK4, _QK8, _QK16 = (_qk16(g) for g in (1, 2, 4, 8, 16))
_QK8C = _qk16(8, 128)  # Qwen3: g = 8, D = 128, 16 consecutive rows of a block
_PV1, _PV2, _PV4, _PV8 = (_pv32(h) for h in (1, 2, 4, 8))
_SM1, _SM2, _SM4, _SM8, _SM16 = (_softmax16(g) for g in (1, 2, 4, 8, 16))


@njit_kernel
def _sm_call(gt, S, s_off, n, st, st_off):
    if gt == 8:
        _SM8(S, s_off, n, st, st_off)
    elif gt == 16:
        _SM16(S, s_off, n, st, st_off)
    elif gt == 4:
        _SM4(S, s_off, n, st, st_off)
    elif gt == 2:
        _SM2(S, s_off, n, st, st_off)
    else:
        _SM1(S, s_off, n, st, st_off)


@njit_kernel
def _qk_call(gt, contig, qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off):
    if contig:
        _QK8C(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 8:
        _QK8(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 16:
        _QK16(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 4:
        _QK4(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)
    elif gt == 2:
        _QK2(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)
    else:
        _QK1(qp, q_off, kc, vc, koff, k0, pk0, nsteps, scale, out, out_off)


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


@njit_kernel(fastmath=_FM)
def _exp_neg(x):
    """``exp(x)`` for float32 ``x <= 0`` (``-inf`` and ``x < -87`` give 0): Cody-Waite
    reduction by ln 2, SLEEF's degree-6 polynomial, exponent by integer add; < 2 ulp.
    Branch-free and call-free so loops over it vectorise."""
    xc = max(x, _XMIN)
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    u = _C0
    u = u * r + _C1
    u = u * r + _C2
    u = u * r + _C3
    u = u * r + _C4
    u = u * r + _C5
    u = u * r * r + r + _ONE
    scale = f32_from_bits(np.uint32((np.int32(k) + np.int32(127)) << np.int32(23)))
    y = np.float32(u * scale)
    return y if x >= _XMIN else _ZERO


@njit_kernel
def _bf16_rne(x):
    """float32 -> nearest-even bf16 value as float32 (``common.bf16`` rounding without its
    NaN branch, so loops over it vectorise; finite values, ±inf and the default NaN
    patterns round like torch)."""
    b = f32_bits(np.float32(x))
    r = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + ((b >> np.uint32(16)) & np.uint32(1)))
    return f32_from_bits(r & np.uint32(0xFFFF0000))


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
    for th in prange(T * nkv):
        t = th // nkv
        kvh = th % nkv
        dst = qpk[th].view(np.uint32)
        for hh in range(g):
            qr = q[t, kvh * g + hh]
            ti = hh // gt
            o = ti * gt * D // 2 + (hh - ti * gt) * E
            for w in range(D // 2):  # pair w -> step w >> sh, lane hl·E + (w & (E-1))
                lo = f32_bits(_bf16_rne(qr[2 * w])) >> np.uint32(16)
                hi = f32_bits(_bf16_rne(qr[2 * w + 1])) & np.uint32(0xFFFF0000)
                dst[o + (w >> sh) * 16 + (w & (E - 1))] = hi | lo


@njit_kernel(parallel=True, fastmath=_FM)
def _attn_bf16_dot(qpk, kc, vc, bt, seq, items, nkv, BS, gt, D, scale, pm, pl, pacc):
    """bf16 fast path: one prange iteration per work item ``items[i] = (t, s0, s1)``
    (query row t, its tokens [s0, s1), all kv heads): per chunk of ``_CHUNK`` tokens the
    kv heads in turn (so whole blocks are read in address order), each head's q·k tiles,
    online-softmax step and p·v tiles; the next (chunk, head) unit's K/V rows are
    prefetched from inside the q·k tiles. Writes the item's per-head running max, sum
    and unnormalised accumulator ``pm/pl [NI, nq]``, ``pacc [NI, nq, D]``."""
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
                                _qk_call(gt, contig and c16 + 16 <= n, qpf, qo, kc, vc, koff, kb + c16, pb + c16,
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


@njit_kernel(parallel=True, fastmath=_FM)
def _attn_plain(q, kc, vc, bt, seq, items, nkv, BS, scale, pm, pl, pacc):
    """Plain-Numba path (any D, float32 or bf16-bits caches); same items and outputs as
    :func:`_attn_bf16_dot`."""
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
        S = np.empty((C, g), np.float32)
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
                    o = koff[kvh * nt + c0 + c]
                    for d in range(D):
                        row[d] = load_f32(kc[o + d])
                    for h in range(g):
                        sc = _ZERO
                        for d in range(D):
                            sc += qh[h, d] * row[d]
                        S[c, h] = sc * scale
                for h in range(g):
                    mnew = m[h]
                    for c in range(n):
                        mnew = max(mnew, S[c, h])
                    alpha = _exp_neg(m[h] - mnew)
                    m[h] = mnew
                    ls = _ZERO
                    for c in range(n):
                        e = _exp_neg(S[c, h] - mnew)
                        S[c, h] = e
                        ls += e
                    lsum[h] = lsum[h] * alpha + ls
                    for d in range(D):
                        ah[h, d] *= alpha
                for c in range(n):
                    o = koff[kvh * nt + c0 + c]
                    for d in range(D):
                        row[d] = load_f32(vc[o + d])
                    for h in range(g):
                        p = S[c, h]
                        for d in range(D):
                            ah[h, d] += p * row[d]
            for h in range(g):
                pm[it, kvh * g + h] = m[h]
                pl[it, kvh * g + h] = lsum[h]


@njit_kernel(parallel=True, fastmath=_FM)
def _combine(pm, pl, pacc, first, nsplit, g, to_bf16, perm, out):
    """``out[t, h·D + d] = rnd(Σ_s e_s·acc_s[h, d] / Σ_s e_s·l_s[h])``, ``e_s = exp(m_s[h] -
    max_s m_s[h])`` over row t's splits in order; one prange iteration per (row, group of
    g heads). ``perm``: acc columns are in the :func:`_pv32` order (see there)."""
    NI, nq, D = pacc.shape
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
    W = max(_MIN_SPLIT, (W + _CHUNK - 1) // _CHUNK * _CHUNK)
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


def _index_vec(x: Any, name: str, T: int) -> np.ndarray:
    import torch

    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 torch tensor [T], got {getattr(x, 'dtype', type(x))}")
    if x.shape != (T,):
        raise ValueError(f"{name} must have shape [T={T}], got {tuple(x.shape)}")
    return x.detach().numpy().astype(np.int32, copy=False)


def _cache_view(c: Any, name: str, dtype: Any, shape: tuple | None) -> np.ndarray:
    import torch

    if not isinstance(c, torch.Tensor) or c.dim() != 4:
        raise ValueError(f"{name} must be a 4-D torch tensor [num_blocks, nkv, block_size, D], "
                         f"got {tuple(getattr(c, 'shape', ())) or type(c).__name__}")
    if c.dtype != dtype:
        raise TypeError(f"{name} dtype must be {dtype} (= dtype), got {c.dtype}")
    if shape is not None and tuple(c.shape) != shape:
        raise ValueError(f"{name} shape {tuple(c.shape)} must equal k_cache's {shape}")
    if c.device.type != "cpu" or not c.is_contiguous() or c.requires_grad:
        raise ValueError(f"{name} must be a contiguous CPU tensor without grad")
    if dtype == torch.bfloat16:
        return c.view(torch.int16).numpy().view(np.uint16).reshape(-1)
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
    import torch

    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float32:
        raise TypeError(f"q must be a float32 torch tensor [T, nq, D], got {getattr(q, 'dtype', type(q))}")
    if q.dim() != 3:
        raise ValueError(f"q must have shape [T, nq, D], got {tuple(q.shape)}")
    T, nq, D = q.shape
    kc = _cache_view(k_cache, "k_cache", dtype, None)
    vc = _cache_view(v_cache, "v_cache", dtype, tuple(k_cache.shape))
    NB, nkv, BS, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache/v_cache head dim {Dk} must equal q's D={D}")
    if nkv < 1 or BS < 1 or nq % nkv:
        raise ValueError(f"q heads ({nq}) must be a multiple of the cache's kv heads ({nkv})")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_tables must be an int32/int64 torch tensor [S, max_blocks], "
                        f"got {getattr(block_tables, 'dtype', type(block_tables))}")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must have shape [S, max_blocks], got {tuple(block_tables.shape)}")
    bt = np.ascontiguousarray(block_tables.detach().numpy().astype(np.int32, copy=False))
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
    qa = q.detach().numpy()
    if not qa.flags.c_contiguous:
        qa = np.ascontiguousarray(qa)
    g = nq // nkv
    NI = items.shape[0]
    pm = np.empty((NI, nq), np.float32)
    pl = np.empty((NI, nq), np.float32)
    pacc = np.empty((NI, nq, D), np.float32)
    sc = np.float32(scale)
    if dtype == torch.bfloat16 and USE_BF16_DOT and D % 32 == 0:
        gt = 16
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
