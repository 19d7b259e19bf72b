"""AVX2 INT8 register tiles (llvmlite ``@intrinsic``) and the one seam that picks the INT8
tile of the process (:func:`int8_bcast_tile`).

The AVX2 tile reads exactly the operands of the VNNI tile (:func:`.x86.vnni_bcast_tile`):
broadcast-packed weights ``[Np/16][Kp/4][16][4]`` int8 (a 64-byte block = two ymm halves of
8 channels x 4 k) and activations in the same ``[K/4][T][4]`` layout, and has the same Numba
signature, so every INT8 kernel runs on either tile without another copy of its code. The
activation bytes are the tile's own: the VNNI tile reads ``u8 = q + 128``, this one the
signed ``q`` itself (:data:`.gemm_pack.ACT_OFFSET`; every packer writes the process's).

**Sign folding** (AVX2 has no ``vpdpbusd``; ``vpmaddubsw`` multiplies u8 by s8 and
*saturates* its int16 pair sums, so ``u8 = q + 128`` would overflow: 2·255·127 > 32767).
Per 4-byte k-group, for each weight half ``w`` (32 bytes) and token broadcast ``q``
(the signed activation, ``|q| <= 127``)::

    wa  = |w|                              # u8; |-128| = 128 is exact as u8
    qs  = vpsignb(q, w)                    # q·sign(w) (0 where w = 0)
    p16 = vpmaddubsw(wa, qs)               # |w|·q·sgn(w) = w·q, pair sums <= 2·128·127 = 32512: exact
    acc += vpmaddwd(p16, ones16)           # int32, the 4 k of each channel in its lane

i.e. the **exact** ``Σ q·w`` with no zero point: the ``"avx2"`` packed weights carry
``wsum128 = 0`` (:func:`.gemm_pack.zero_point`), so every epilogue that subtracts
``wsum128`` is unchanged. Exact for any int8 weight and activations in ``[-127, 127]``
(what the golden quantiser produces); ``q = -128`` against a negative weight would wrap in
``vpsignb``, so the raw-int8 GEMM entry points reject ``-128`` activations on this tile.

**Register tiles.** AVX2 has 16 ymm registers. A call covers ``tt`` tokens x ``nb`` blocks of
16 channels (like the VNNI tile) as a fixed sequence of sub-tiles of ``ts`` tokens x ``hs``
ymm halves, each its own k loop, chosen so that ``ts·hs`` accumulators + ``2·hs`` weight
registers (``w``, ``|w|``) stay within :data:`AVX2_REGS` (:func:`avx2_plan`; checked in the
asm compiled for ``znver3``: no ymm spill in any k loop). Sub-tiles over different halves
read disjoint weights; a token split (``tt > 11``) re-reads the halves' weights (L1/L2). Only call from kernels that run when the CPU has AVX2
(``jit.HAS_AVX2``): the seam below never hands it out otherwise.
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils

from . import jit
from .x86 import VNNI_NB, acc_loop, bcast_tile_intrinsic, vnni_bcast_tile

__all__ = ["AVX2_REGS", "avx2_bcast_tile", "avx2_plan", "int8_bcast_tile"]

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VB = ir.VectorType(_I8, 32)
_VW = ir.VectorType(_I16, 16)
_VD = ir.VectorType(_I32, 8)

#: ymm registers a sub-tile may hold live: accumulators + 2 per weight half. 14 (16 minus
#: the token broadcast and one temporary) spilled in the 5x4 and 12x2 tiles compiled for
#: znver3 (16 ymm, no AVX-512VL); with 13 no tile height spills a ymm register in its k loop.
AVX2_REGS = 13


def avx2_plan(tt: int, nb: int, regs: int = AVX2_REGS) -> list[tuple[int, int, int, int]]:
    """Sub-tiles ``(t0, ts, h0, hs)`` (tokens ``t0..t0+ts-1`` x ymm halves ``h0..h0+hs-1``)
    covering a ``tt x 16·nb`` tile: the fewest token groups with ``ts + 2 <= regs``, then the
    largest ``hs`` dividing ``2·nb`` with ``ts·hs`` accumulators + ``2·hs`` weight registers
    ``<= regs`` (one token: ``w``/``|w|`` are used once, so 3 transient registers instead);
    ordered halves-major so a half's weights are re-read right away by the next token group."""
    nh = 2 * nb
    groups = 1
    while -(-tt // groups) + 2 > regs:
        groups += 1
    ts = -(-tt // groups)
    hs = max(h for h in range(1, nh + 1)
             if nh % h == 0 and (ts * h + (2 * h if ts > 1 else 3) <= regs or h == 1))
    return [(t0, min(ts, tt - t0), h0, hs) for h0 in range(0, nh, hs) for t0 in range(0, tt, ts)]


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, base, off, ty):
    return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=1)


@cache
def avx2_bcast_tile(tt: int, nb: int = VNNI_NB, prefetch: int = 0, pf_locality: int = 3,
                    regs: int = AVX2_REGS):
    """Build the ``tt x nb`` AVX2 tile intrinsic (cached per argument tuple).

    Numba signature and operands exactly as :func:`.x86.vnni_bcast_tile` (offsets and
    strides in elements, ``intp``)::

        tile(xp, x_off, x_kstride, wp, w_off, w_bstride, nkg, acc, acc_off, acc_tstride, accumulate)

    but the activations are the signed bytes ``q`` (not ``q + 128``) and the result is the
    exact signed product (no zero point): for ``t < tt``, ``j < nb``, lane ``l < 16``:
    ``acc[acc_off + t*acc_tstride + 16*j + l] = (acc[...] if accumulate else 0) +
    Σ_{kg<nkg} Σ_{b<4} int8(xp[x_off + kg*x_kstride + 4*t + b]) *
    wp[w_off + j*w_bstride + 64*kg + 4*l + b]``, for activations in [-127, 127].
    ``prefetch`` > 0: ``llvm.prefetch`` of each weight block that many bytes ahead (first
    token group only). ``regs``: the register budget of :func:`avx2_plan`. Bounds are not
    checked."""
    if not (1 <= tt <= 64 and 1 <= nb <= 16):
        raise ValueError(f"AVX2 tile {tt}x{nb} out of range")
    plan = avx2_plan(tt, nb, regs)

    def codegen(context, builder, sig, args):
        (xa, x_off, x_ks, wa, w_off, w_bs, nkg, aa, a_off, a_ts, accum) = args
        i8p = _I8.as_pointer()
        xptr = builder.bitcast(context.make_array(sig.args[0])(context, builder, xa).data, i8p)
        wptr = builder.bitcast(context.make_array(sig.args[3])(context, builder, wa).data, i8p)
        aptr = builder.bitcast(context.make_array(sig.args[7])(context, builder, aa).data, i8p)
        c = lambda v, t=_I64: ir.Constant(t, v)
        flag = accum if accum.type == _I1 else builder.icmp_unsigned("!=", accum, ir.Constant(accum.type, 0))
        x_base = builder.gep(xptr, [x_off])
        # weight half h: block h//2, bytes 32*(h%2) of each 64-byte k-group
        w_bases = [builder.gep(wptr, [builder.add(w_off, builder.add(builder.mul(w_bs, c(h // 2)), c(32 * (h % 2))))])
                   for h in range(2 * nb)]
        pmaddubsw = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _VW, [_VB, _VB])
        pmaddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _VD, [_VW, _VW])
        psignb = _fn(builder, "llvm.x86.avx2.psign.b", _VB, [_VB, _VB])
        pf = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, _I32, _I32, _I32]) if prefetch else None
        ones = ir.Constant(_VW, [1] * 16)
        zb = ir.Constant(_VB, [0] * 32)
        zd = ir.Constant(_VD, [0] * 8)
        idx0 = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)

        for (t0, ts, h0, hs) in plan:
            halves = range(h0, h0 + hs)
            # accumulator byte offsets: 4 * (a_off + t*a_ts + 16*(h//2) + 8*(h%2))
            a_offs = {(t, h): builder.mul(c(4), builder.add(a_off, builder.add(
                builder.mul(a_ts, c(t)), c(16 * (h // 2) + 8 * (h % 2))))) for t in range(t0, t0 + ts) for h in halves}
            keys = list(a_offs)
            init = [builder.select(flag, _load(builder, aptr, a_offs[k], _VD), zd) for k in keys]
            pf_blocks = sorted({h // 2 for h in halves}) if (pf is not None and t0 == 0) else []

            def step(kg, cur, halves=halves, t0=t0, ts=ts, keys=keys, pf_blocks=pf_blocks):
                wk = builder.mul(kg, c(64))
                ws = {h: _load(builder, w_bases[h], wk, _VB) for h in halves}
                wabs = {h: builder.select(builder.icmp_signed("<", ws[h], zb), builder.sub(zb, ws[h]), ws[h])
                        for h in halves}
                for b in pf_blocks:
                    builder.call(pf, [builder.gep(w_bases[2 * b], [builder.add(wk, c(prefetch))]), c(0, _I32),
                                      c(pf_locality, _I32), c(1, _I32)])
                xk = builder.mul(kg, x_ks)
                acc = dict(zip(keys, cur))
                for t in range(t0, t0 + ts):
                    s = _load(builder, x_base, builder.add(xk, c(4 * t)), _I32)
                    v = builder.insert_element(ir.Constant(ir.VectorType(_I32, 8), None), s, c(0, _I32))
                    v = builder.shuffle_vector(v, ir.Constant(ir.VectorType(_I32, 8), None), idx0)
                    q = builder.bitcast(v, _VB)
                    for h in halves:
                        qs = builder.call(psignb, [q, ws[h]])
                        p16 = builder.call(pmaddubsw, [wabs[h], qs])
                        acc[(t, h)] = builder.add(acc[(t, h)], builder.call(pmaddwd, [p16, ones]))
                return [acc[k] for k in keys]

            final = acc_loop(builder, nkg, init, step, "avx2")
            for k, v in zip(keys, final):
                builder.store(v, builder.bitcast(builder.gep(aptr, [a_offs[k]]), _VD.as_pointer()), align=1)
        return context.get_dummy_value()

    return bcast_tile_intrinsic(codegen, types.uint8, types.int8,
                                f"avx2_bcast_tile_{tt}x{nb}{'_pf' if prefetch else ''}_r{regs}_s")


def int8_bcast_tile(tt: int, nb: int = VNNI_NB, prefetch: int = 0):
    """THE seam of the INT8 kernels: the ``tt x nb`` broadcast-layout register tile of this
    process's :data:`jit.INT8_TILE` — :func:`.x86.vnni_bcast_tile` (``"vnni"``, result
    ``Σ (q+128)·w``) or :func:`avx2_bcast_tile` (``"avx2"``, result ``Σ q·w``); the
    zero point of each is :func:`.gemm_pack.zero_point` of the layout. Without either (a
    CPU below AVX2) the VNNI tile object is returned but never compiled: no packed weight
    can be made there (``pack_w8a8`` raises), so no kernel calling it runs."""
    if jit.INT8_TILE == "avx2":
        return avx2_bcast_tile(tt, nb, prefetch)
    return vnni_bcast_tile(tt, nb, prefetch)
