"""llvmlite ``@intrinsic`` building blocks that emit exact x86 AVX-512 instructions.

LLVM never generates ``vpdpbusd`` (AVX512-VNNI) from scalar code (lab notes §6), so the
INT8 GEMM's inner loop is written directly in LLVM IR here and inlined into Numba kernels.

**Only call these from kernels that run when** ``jit.HAS_VNNI`` **is true**: compiling the
``llvm.x86.avx512.vpdpbusd.512`` intrinsic for a CPU without AVX512-VNNI fails in LLVM's
instruction selection, and running it raises SIGILL. Numba compiles lazily, so a kernel
that uses them is only compiled on its first call.

``vpdpbusd zmm_acc, zmm_a, zmm_b``: for each of the 16 int32 lanes ``l``,
``acc[l] += Σ_{b<4} u8(a[4l+b]) * s8(b[4l+b])`` with exact int32 wrap-around arithmetic
(non-saturating form).

Broadcast tile (``vnni_bcast_tile``), the "fbgemm/TVM" layout:

* packed weights: ``[N/16][K/4][16][4]`` int8 — one 64-byte vector holds 4 consecutive k
  values of 16 output channels (``wp[blk*KG*64 + kg*64 + 4*l + b] = W[16*blk + l, 4*kg + b]``);
* packed activations: ``[K/4][T][4]`` uint8 (``q + 128``) — the 4 bytes of token ``t`` and
  k-group ``kg`` are broadcast to all 16 lanes and multiplied with the weight vector;
* a ``TT x NB`` register tile keeps ``TT*NB`` zmm accumulators (``TT`` tokens, ``NB``
  blocks of 16 channels); each weight vector load feeds ``TT`` instructions and each
  broadcast feeds ``NB``, and the results are already in output order (no horizontal
  reductions).
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["GROUP_TILE_REGS", "VNNI_NB", "BFloatType", "acc_loop", "bcast_tile_intrinsic", "bf16_dot_tile",
           "vnni_bcast_tile", "vnni_group_tile"]

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
_I1 = ir.IntType(1)

#: Number of 16-channel blocks per register tile (64 output channels per tile).
VNNI_NB = 4


def _vpdpbusd(builder: ir.IRBuilder) -> ir.Function:
    fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")


def _prefetch(builder: ir.IRBuilder) -> ir.Function:
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")


def _ptr(builder: ir.IRBuilder, base: ir.Value, byte_off: ir.Value) -> ir.Value:
    return builder.gep(base, [byte_off])


def _vload(builder: ir.IRBuilder, base: ir.Value, byte_off: ir.Value) -> ir.Value:
    p = builder.bitcast(_ptr(builder, base, byte_off), _V16.as_pointer())
    return builder.load(p, align=1)


def _vstore(builder: ir.IRBuilder, val: ir.Value, base: ir.Value, byte_off: ir.Value) -> None:
    p = builder.bitcast(_ptr(builder, base, byte_off), _V16.as_pointer())
    builder.store(val, p, align=1)


def _bcast32(builder: ir.IRBuilder, base: ir.Value, byte_off: ir.Value) -> ir.Value:
    p = builder.bitcast(_ptr(builder, base, byte_off), _I32.as_pointer())
    s = builder.load(p, align=1)
    v = builder.insert_element(ir.Constant(_V16, None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_V16, None), ir.Constant(_V16, [0] * 16))


def acc_loop(b: ir.IRBuilder, n: ir.Value, inits: list, body, name: str) -> list:
    """Emit ``for i in range(n)`` (``i``, ``n``: i64) carrying the SSA values ``inits`` (one
    phi each); ``body(i, cur) -> new`` emits the loop body (it may add blocks) and returns
    the updated values. Leaves the builder in the exit block and returns the final values
    (the ``inits`` when ``n <= 0``). Shared by every register-tile intrinsic."""
    entry = b.basic_block
    loop = b.append_basic_block(name)
    done = b.append_basic_block(name + ".done")
    zero = ir.Constant(_I64, 0)
    b.cbranch(b.icmp_signed(">", n, zero), loop, done)
    b.position_at_end(loop)
    i = b.phi(_I64)
    i.add_incoming(zero, entry)
    cur = []
    for v in inits:
        ph = b.phi(v.type)
        ph.add_incoming(v, entry)
        cur.append(ph)
    new = body(i, cur)
    i_next = b.add(i, ir.Constant(_I64, 1))
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


def bcast_tile_intrinsic(codegen, xdt, wdt, name: str):
    """The Numba ``@intrinsic`` of a broadcast-layout register tile (signature
    ``tile(xp, x_off, x_kstride, wp, w_off, w_bstride, nkg, acc, acc_off, acc_tstride,
    accumulate)``; see :func:`vnni_bcast_tile`) with activations of dtype ``xdt``, weights
    of ``wdt``, int32 accumulators, emitted by ``codegen``. Shared by the VNNI and the AVX2
    tiles (:mod:`.x86_avx2`)."""

    @intrinsic
    def _tile(typingctx, xp, x_off, x_kstride, wp, w_off, w_bstride, nkg, acc, acc_off,
              acc_tstride, accumulate):
        for a, dt in ((xp, xdt), (wp, wdt), (acc, types.int32)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        sig = types.void(xp, types.intp, types.intp, wp, types.intp, types.intp, types.intp,
                         acc, types.intp, types.intp, types.boolean)
        return sig, codegen

    _tile.__name__ = name
    return _tile


@cache
def vnni_bcast_tile(tt: int, nb: int = VNNI_NB, prefetch: int = 0, signed_x: bool = False,
                    pf_locality: int = 3):
    """Build the ``tt x nb`` broadcast-layout VNNI tile intrinsic.

    Numba signature (all offsets/strides in elements of the respective array, ``intp``)::

        tile(xp, x_off, x_kstride, wp, w_off, w_bstride, nkg, acc, acc_off, acc_tstride, accumulate)

    * ``xp``: 1-D uint8 packed activations, ``wp``: 1-D int8 packed weights, ``acc``: 1-D
      int32 output (C-contiguous arrays);
    * for ``t < tt``, ``j < nb``, lane ``l < 16``:
      ``acc[acc_off + t*acc_tstride + 16*j + l] = (acc[...] if accumulate else 0) +
      Σ_{kg<nkg} Σ_{b<4} xp[x_off + kg*x_kstride + 4*t + b] * wp[w_off + j*w_bstride + 64*kg + 4*l + b]``
      in exact int32 arithmetic.
    * ``prefetch`` > 0 adds a software prefetch (``llvm.prefetch``, locality
      ``pf_locality``: 3 = ``prefetcht0``) of each weight stream that many bytes ahead;
    * ``signed_x=True`` swaps the operand roles (activations s8 broadcast, weights u8): an
      alternative that measured the same speed, kept for experiments.

    Returns the intrinsic (cached per argument tuple). Bounds are not checked.
    """
    if not (1 <= tt and 1 <= nb and tt * nb <= 28):
        raise ValueError(f"tile {tt}x{nb} does not fit in 32 zmm registers")

    def codegen(context, builder, sig, args):
        (xa, x_off, x_ks, wa, w_off, w_bs, nkg, aa, a_off, a_ts, accum) = args
        xty, wty, aty = sig.args[0], sig.args[3], sig.args[7]
        xptr = context.make_array(xty)(context, builder, xa).data
        wptr = context.make_array(wty)(context, builder, wa).data
        aptr = context.make_array(aty)(context, builder, aa).data
        xptr = builder.bitcast(xptr, _I8.as_pointer())
        wptr = builder.bitcast(wptr, _I8.as_pointer())
        aptr = builder.bitcast(aptr, _I8.as_pointer())
        four = ir.Constant(_I64, 4)
        c64 = ir.Constant(_I64, 64)
        x_base = _ptr(builder, xptr, x_off)
        w_bases = [_ptr(builder, wptr, builder.add(w_off, builder.mul(w_bs, ir.Constant(_I64, j))))
                   for j in range(nb)]
        # accumulator addresses (bytes): 4 * (a_off + t*a_ts + 16*j)
        a_offs = [[builder.mul(four, builder.add(a_off, builder.add(
            builder.mul(a_ts, ir.Constant(_I64, t)), ir.Constant(_I64, 16 * j))))
            for j in range(nb)] for t in range(tt)]
        flag = accum if accum.type == _I1 else builder.icmp_unsigned("!=", accum, ir.Constant(accum.type, 0))
        init = []
        for t in range(tt):
            row = []
            for j in range(nb):
                v = _vload(builder, aptr, a_offs[t][j])
                row.append(builder.select(flag, v, ir.Constant(_V16, [0] * 16)))
            init.append(row)
        dot = _vpdpbusd(builder)
        pf = _prefetch(builder) if prefetch else None

        def step(kg, flat):
            wk = builder.mul(kg, c64)
            ws = [_vload(builder, w_bases[j], wk) for j in range(nb)]
            if pf is not None:
                pk = builder.add(wk, ir.Constant(_I64, prefetch))
                for j in range(nb):
                    builder.call(pf, [_ptr(builder, w_bases[j], pk), ir.Constant(_I32, 0),
                                      ir.Constant(_I32, pf_locality), ir.Constant(_I32, 1)])
            xk = builder.mul(kg, x_ks)
            new = []
            for t in range(tt):
                xb = _bcast32(builder, x_base, builder.add(xk, ir.Constant(_I64, 4 * t)))
                for j in range(nb):
                    acc = flat[t * nb + j]
                    new.append(builder.call(dot, [acc, ws[j], xb] if signed_x else [acc, xb, ws[j]]))
            return new

        final = acc_loop(builder, nkg, [v for row in init for v in row], step, "vnni")
        for t in range(tt):
            for j in range(nb):
                _vstore(builder, final[t * nb + j], aptr, a_offs[t][j])
        return context.get_dummy_value()

    xdt, wdt = (types.int8, types.uint8) if signed_x else (types.uint8, types.int8)
    return bcast_tile_intrinsic(
        codegen, xdt, wdt, f"vnni_bcast_tile_{tt}x{nb}{'_pf' if prefetch else ''}{'_sx' if signed_x else ''}")


# --------------------------------------------------------------------------- grouped VNNI tile (int8_g32)
# AVX-512 VNNI register tile of the group-scaled INT8 GEMM (:mod:`.gemm_group`): the
# block sums stay in registers and are folded into float32 register accumulators after
# every block of ``G`` inputs, as llama.cpp's Q8_0 dot does.
#
# Why in registers: folding through memory (tile stores its int32 accumulators, a Numba
# loop reloads them) stalls on store-to-load forwarding of the 64-byte stores once per
# block of 32 inputs; measured 3x slower than the tile alone at T=1.
#
# **Only call from kernels that run when** ``jit.INT8_TILE == "vnni"`` (see the module docstring).
#
# Numba signature (offsets and strides in elements of their array, ``intp``)::
#
#     tile(xp, x_off, x_ks, wp, w_off, w_bs, gkg, ng, sw, sw_off, sx, corr, sc_off, sc_ts,
#          facc, f_off, f_ts, accumulate)
#
# * ``xp`` int8 packed activations ``[K/4][TP][4]`` (raw ``q``, the *signed* operand of
#   ``vpdpbusd``); ``wp`` uint8 packed weights ``[Np/16][K/4][16][4]`` holding ``w + 128``;
# * for blocks ``g < ng`` (each ``gkg`` k-groups of 4), tokens ``t < tt``, weight blocks
#   ``j < nb``, lanes ``l < 16``, with ``c = corr[sc_off + t*sc_ts + g]`` (int32,
#   ``128·Σ q`` of the block) and ``s = sx[sc_off + t*sc_ts + g]``::
#
#       isum = Σ_{kg in block g} Σ_b xp[x_off + kg*x_ks + 4t + b] · wp[w_off + j*w_bs + 64 kg + 4l + b]
#       f[t, j, l] = fl(f + fl(fl(f32(isum - c) · s) · f16(sw[sw_off + 64 g + 16 j + l])))
#
#   starting from ``facc[f_off + t*f_ts + 16 j + l]`` when ``accumulate`` else 0, and
#   stored there at the end.
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, 16)
_VHF = ir.VectorType(ir.HalfType(), 16)

#: zmm registers a tile may keep live: int + float accumulators, nb weights, a broadcast.
GROUP_TILE_REGS = 30


@cache
def vnni_group_tile(tt: int, nb: int, prefetch: int = 0):
    """Build the ``tt x nb`` grouped VNNI tile intrinsic (see the comment above);
    cached per argument tuple. Raises ValueError when the tile does not fit in zmm
    registers (``2·tt·nb + nb + 1 > GROUP_TILE_REGS``)."""
    if not (tt >= 1 and nb >= 1 and 2 * tt * nb + nb + 1 <= GROUP_TILE_REGS):
        raise ValueError(f"grouped tile {tt}x{nb} does not fit in the zmm registers")

    def codegen(context, builder, sig, args):
        (xa, x_off, x_ks, wa, w_off, w_bs, gkg, ng, swa, sw_off, sxa, ca, sc_off, sc_ts,
         fa, f_off, f_ts, accum) = args
        i8p = _I8.as_pointer()

        def data(i, v):
            return builder.bitcast(context.make_array(sig.args[i])(context, builder, v).data, i8p)

        xptr, wptr, swptr, sxptr, cptr, fptr = (data(0, xa), data(3, wa), data(8, swa), data(10, sxa),
                                                 data(11, ca), data(14, fa))
        k = lambda v: ir.Constant(_I64, v)  # noqa: E731
        x_base = builder.gep(xptr, [x_off])
        w_bases = [builder.gep(wptr, [builder.add(w_off, builder.mul(w_bs, k(j)))]) for j in range(nb)]
        f_offs = [[builder.mul(k(4), builder.add(f_off, builder.add(builder.mul(f_ts, k(t)), k(16 * j))))
                   for j in range(nb)] for t in range(tt)]
        flag = accum if accum.type == _I1 else builder.icmp_unsigned("!=", accum, ir.Constant(accum.type, 0))
        zf = ir.Constant(_VF, [0.0] * 16)
        finit = [builder.select(flag, builder.load(builder.bitcast(builder.gep(fptr, [f_offs[t][j]]),
                                                                   _VF.as_pointer()), align=1), zf)
                 for t in range(tt) for j in range(nb)]
        dot = _vpdpbusd(builder)
        pf = _prefetch(builder) if prefetch else None
        zi = ir.Constant(_V16, [0] * 16)

        def bcast(v, vty):
            e = builder.insert_element(ir.Constant(vty, None), v, ir.Constant(_I32, 0))
            return builder.shuffle_vector(e, ir.Constant(vty, None), ir.Constant(_V16, [0] * 16))

        def group(g, fcur):
            kg0 = builder.mul(g, gkg)

            def step(kgl, flat):
                kg = builder.add(kg0, kgl)
                wk = builder.mul(kg, k(64))
                ws = [_vload(builder, w_bases[j], wk) for j in range(nb)]
                if pf is not None:
                    pk = builder.add(wk, k(prefetch))
                    for j in range(nb):
                        builder.call(pf, [builder.gep(w_bases[j], [pk]), ir.Constant(_I32, 0),
                                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                xk = builder.mul(kg, x_ks)
                new = []
                for t in range(tt):
                    xb = _bcast32(builder, x_base, builder.add(xk, k(4 * t)))
                    for j in range(nb):
                        new.append(builder.call(dot, [flat[t * nb + j], ws[j], xb]))
                return new

            isum = acc_loop(builder, gkg, [zi] * (tt * nb), step, "gdot")
            # weight scales of block g: float16 -> float32 (vcvtph2ps), 16 per weight block j
            swo = builder.add(sw_off, builder.mul(g, k(64)))
            swv = []
            for j in range(nb):
                p = builder.bitcast(builder.gep(swptr, [builder.mul(k(2), builder.add(swo, k(16 * j)))]),
                                    _VHF.as_pointer())
                swv.append(builder.fpext(builder.load(p, align=1), _VF))
            out = []
            for t in range(tt):
                so = builder.mul(k(4), builder.add(sc_off, builder.add(builder.mul(sc_ts, k(t)), g)))
                cv = bcast(builder.load(builder.bitcast(builder.gep(cptr, [so]), _I32.as_pointer()), align=1), _V16)
                sv = bcast(builder.load(builder.bitcast(builder.gep(sxptr, [so]), _F32.as_pointer()), align=1), _VF)
                for j in range(nb):
                    v = builder.sitofp(builder.sub(isum[t * nb + j], cv), _VF)
                    v = builder.fmul(builder.fmul(v, sv), swv[j])
                    out.append(builder.fadd(fcur[t * nb + j], v))
            return out

        final = acc_loop(builder, ng, finit, group, "ggroup")
        for t in range(tt):
            for j in range(nb):
                builder.store(final[t * nb + j], builder.bitcast(builder.gep(fptr, [f_offs[t][j]]),
                                                                 _VF.as_pointer()), align=1)
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, xp, x_off, x_ks, wp, w_off, w_bs, gkg, ng, sw, sw_off, sx, corr, sc_off,
              sc_ts, facc, f_off, f_ts, accumulate):
        for a, dt in ((xp, types.int8), (wp, types.uint8), (sw, types.uint16), (sx, types.float32),
                      (corr, types.int32), (facc, types.float32)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        ip = types.intp
        sig = types.void(xp, ip, ip, wp, ip, ip, ip, ip, sw, ip, sx, corr, ip, ip, facc, ip, ip, types.boolean)
        return sig, codegen

    _tile.__name__ = f"vnni_group_tile_{tt}x{nb}{'_pf' if prefetch else ''}"
    return _tile


# --------------------------------------------------------------------------- vdpbf16ps (AVX512_BF16)
# Only call from kernels that run when ``jit.HAS_AVX512BF16`` is true (same reason as above).
class BFloatType(ir.Type):
    """LLVM's ``bfloat`` scalar type (llvmlite has none)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, BFloatType)

    def __hash__(self):
        return hash("bfloat")


_F32T = ir.FloatType()
_V16F = ir.VectorType(_F32T, 16)
_V32BF = ir.VectorType(BFloatType(), 32)
_I64T = ir.IntType(64)


def _hsum16(builder, v):
    """Lane sum of a <16 x float> as a fixed shuffle tree ((0..7)+(8..15), then halves)."""
    n = 16
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@cache
def bf16_dot_tile(tt: int, nr: int):
    """``tt`` tokens x ``nr`` weight rows of bf16 dot products with ``vdpbf16ps`` (AVX512_BF16).

    Numba signature (offsets/strides in elements)::

        tile(x, x_off, x_tstride, w, w_off, w_rstride, nk32, out, out_off)

    ``x``/``w``: 1-D uint16 arrays of bf16 bits; ``out``: 1-D float32. For ``t < tt``,
    ``r < nr``: ``out[out_off + t*nr + r] = Σ_{k < 32·nk32} x[x_off + t*x_tstride + k] ·
    w[w_off + r*w_rstride + k]``: 16 fp32 lanes per (t, r), each accumulating pairs of
    exact bf16 products in k order (``vdpbf16ps`` semantics, denormal inputs read as 0),
    then a fixed shuffle-tree lane sum. Deterministic (no data-dependent order)."""
    if not (1 <= tt and 1 <= nr and tt * nr + nr <= 30):
        raise ValueError(f"bf16 tile {tt}x{nr} does not fit in the zmm registers")

    def codegen(context, builder, sig, args):
        (xa, x_off, x_ts, wa, w_off, w_rs, nk, oa, o_off) = args
        i8p = ir.IntType(8).as_pointer()
        xptr = builder.bitcast(context.make_array(sig.args[0])(context, builder, xa).data, i8p)
        wptr = builder.bitcast(context.make_array(sig.args[3])(context, builder, wa).data, i8p)
        optr = builder.bitcast(context.make_array(sig.args[7])(context, builder, oa).data, i8p)
        two = ir.Constant(_I64T, 2)
        x_bases = [builder.gep(xptr, [builder.mul(two, builder.add(x_off, builder.mul(x_ts, ir.Constant(_I64T, t))))])
                   for t in range(tt)]
        w_bases = [builder.gep(wptr, [builder.mul(two, builder.add(w_off, builder.mul(w_rs, ir.Constant(_I64T, r))))])
                   for r in range(nr)]
        fnty = ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF])
        dp = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512bf16.dpbf16ps.512")
        zero_v = ir.Constant(_V16F, [0.0] * 16)

        def step(k, flat):
            kb = builder.mul(k, ir.Constant(_I64T, 64))

            def vload(base):
                p = builder.bitcast(builder.gep(base, [kb]), _V32BF.as_pointer())
                return builder.load(p, align=1)

            ws = [vload(w_bases[r]) for r in range(nr)]
            new = []
            for t in range(tt):
                xv = vload(x_bases[t])
                new.extend(builder.call(dp, [flat[t * nr + r], xv, ws[r]]) for r in range(nr))
            return new

        final = acc_loop(builder, nk, [zero_v] * (tt * nr), step, "bf16dot")
        for j, ph in enumerate(final):
            sval = _hsum16(builder, ph)
            off = builder.mul(ir.Constant(_I64T, 4), builder.add(o_off, ir.Constant(_I64T, j)))
            builder.store(sval, builder.bitcast(builder.gep(optr, [off]), _F32T.as_pointer()), align=1)
        return context.get_dummy_value()

    @intrinsic
    def _tile(typingctx, x, x_off, x_ts, w, w_off, w_rs, nk, out, out_off):
        for a, dt in ((x, types.uint16), (w, types.uint16), (out, types.float32)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        sig = types.void(x, types.intp, types.intp, w, types.intp, types.intp, types.intp, out, types.intp)
        return sig, codegen

    _tile.__name__ = f"bf16_dot_tile_{tt}x{nr}"
    return _tile
