"""llvmlite register tiles of the W4A8 (MXFP4 x per-32 INT8) GEMM, one per INT8 tier:
``"vnni"`` (AVX-512: ``vpshufb`` zmm table decode + ``vpdpbusd``) and ``"avx2"`` (``vpshufb``
ymm + ``vpmaddubsw``/``vpmaddwd``). Read by :mod:`.gemm_mxfp4` (its docstring has the
numerics and the schedule).

**Only call a tile from kernels that run when** ``jit.INT8_TILE`` **is its ISA**:
:func:`w4_tile` hands out the process's tile only (:func:`.x86_avx2.int8_bcast_tile`'s
rule), and Numba compiles an intrinsic on the first call of a kernel that uses it, so the
other tier's instructions are never compiled (an unsupported intrinsic aborts the process
inside LLVM).

Operands (offsets and strides in bytes / elements of their array, ``intp``)::

    tile(xp, x_off, x_ks, wp, w_off, w_bs, ng, sw, sw_off, sx, corr, sc_off, sc_ts,
         facc, f_off, f_ts, accumulate)

* ``xp`` int8 ``[K/4][TP][4]``: raw activations ``q`` (the *signed* operand); token ``t`` of
  k-group ``kg`` at ``x_off + kg·x_ks + 4t``;
* ``wp`` uint8 nibble blocks ``[Np/16][K/8][64]``: byte ``4l + b`` of 64-byte block ``p`` of
  16-channel block ``j`` (at ``w_off + j·w_bs + 64p``) holds the E2M1 code of
  ``W[16j + l, 8p + b]`` in its low nibble and of ``W[16j + l, 8p + 4 + b]`` in its high one;
  the AVX2 tile reads each 64-byte block as two ymm halves of 8 channels;
* decode: one table shuffle per nibble vector maps code ``c`` to ``E2M1_X2[c] +`` :data:`ZP`
  (u8 in [0, 24], the *unsigned* operand), so a k-group's dot is ``Σ q·(w2 + ZP) =
  Σ q·w2 + ZP·Σ q``: the correction ``corr[t, g] = -ZP·Σ_{k in g} q`` is made with the
  activations (as the grouped INT8 GEMM's ``128·Σ q``, :mod:`.gemm_group`; negated so that
  the VNNI tile starts its ``vpdpbusd`` chain from it instead of subtracting in the fold);
* per block ``g < ng`` of 32 inputs (4 nibble blocks), token ``t < tt``, channel ``i < 64``
  (``s = sx[sc_off + t·sc_ts + g]``, ``c = corr[...]``, ``e = sw[sw_off + 64g + i]``)::

      isum = c + Σ_{k in g} q·(w2 + ZP)                          exact int32 (= Σ q·w2)
      f[t, i] = fl(f + fl(fl(f32(isum) · s) · 2^(e - 128)))

  from ``facc[f_off + t·f_ts + i]`` when ``accumulate`` else 0, stored back at the end.

**Exactness.** VNNI: ``vpdpbusd`` is exact int32. AVX2: ``vpmaddubsw`` saturates its int16
pair sums, but ``|q| <= 127`` and ``w2 + ZP <= 24`` bound a pair by ``2·24·127 = 6096``,
so the two pairs of a nibble block and two nibble blocks (4 pairs, ``<= 24384``) add in
int16 exactly before one ``vpmaddwd`` widens them. The UE8M0 scale ``2^(e - 128)`` is built
exactly from its byte (float32 bits ``(e - 1) << 23``, subnormal ``0x200000 << e`` for
``e <= 1``), so no table of float scales is stored.

**Sub-tiles.** One intrinsic covers ``ts`` tokens x ``us`` register units (16 channels on
zmm, 8 on ymm) over ``ng`` blocks, its float accumulators in registers; the kernel covers a
``tt x 64`` tile by looping over them (:func:`w4_plan`), units-major, so a token split
re-reads those weights from L1/L2. One call site per sub-tile shape keeps the compile
short (unrolling every plan in IR took 95 s for the AVX2 heights).

**Streaming**: every block of 32 inputs a sub-tile prefetches its 4 lines of each nibble
stream :func:`w4_prefetch` bytes ahead (VNNI: 2 KiB for one token, else 4 KiB) and 1 line of
the chunk's scale stream a quarter of that ahead, ``prefetcht0``; the VNNI one-token
sub-tile only the first of the 4 lines (the hardware prefetcher fetches the rest) and with
``prefetcht1`` (into L2), and it covers all 4 units of a chunk (4 streams in flight instead
of 2) with one int32 chain per unit. From DRAM (one Flash expert, 2 threads) this took T=1
from 0.68 to 0.55 ms and T=8 from 1.14 to 0.54 ms on Zen 5; on Zen 4 ``prefetcht0`` at T=1
was 20-25 % slower than ``prefetcht1`` or no software prefetch. The AVX2 one-token
sub-tile covers 4 units of 8 channels (two 16-channel streams, both halves of each 64-byte
line in one pass instead of a second pass from L2) and prefetches all 4 lines of each
stream 1 KiB ahead with ``prefetcht1``: one Flash expert from DRAM on Zen 3 0.66 -> 0.50 ms
(median of 3 processes each; 2 units without prefetch 0.60, 0.5 KiB 0.54). The 2- and
3-token AVX2 sub-tiles prefetch 2 KiB ahead (``prefetcht0``): one expert from DRAM, medians
of 3 alternating processes, T=2 0.842 -> 0.794 ms, T=3 1.009 -> 0.844 ms
(``docs/performance.md``, "MXFP4 experts, W4A8").

**AVX2 units fold one at a time**: each unit's block sum is folded into its float
accumulator right after its 4 nibble blocks, so only the float accumulators stay live
across units (VNNI folds after all units, as it was tuned). **AVX2 sub-tiles of 2-8 tokens
are token-major**: per unit and block the 4 nibble blocks are decoded into 8 vectors first,
then each token runs its 8 ``vpmaddubsw`` and is folded before the next, so one token's
int16/int32 sums are live instead of every token's, and one group of up to 8 tokens decodes
each nibble once (before: groups of at most 3 tokens, each decoding again). One Flash
expert hot in L3 on Zen 3, int8/mxfp4 time ratio in the same process: T=4 0.81-0.85 ->
0.99, T=8 0.86-0.98 -> 1.06-1.08, T=16 0.83-0.87 -> 1.01-1.06 (``docs/performance.md``).
The 2-token sub-tile covers 2 units (both halves of each line in one pass, as the 1-token
one covers 4). AVX2 makes the UE8M0 scale's float32 bits as ``max((e-1)·2^23, (e+1)·2^21)`` (the second is the subnormal ``2^-128`` /
``2^-127`` for ``e = 0, 1`` and smaller for ``e >= 2``).

**Fold** (VNNI): ``vscalefps(fl(f32(isum)·s), e - 128)`` is the correctly rounded
``y·2^(e-128)``, the same float32 as the multiply by the exact scale (subnormal results
included, MXCSR default rounding), in 3 instructions per unit instead of 7.
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import jit
from .x86 import acc_loop

__all__ = ["E2M1_X2_ZP", "TS_MAX", "UNIT", "ZP", "tile_isa", "w4_plan", "w4_prefetch", "w4_tile", "w4_units"]

#: Zero point added to the doubled E2M1 values in the decode table (the smallest that
#: makes them unsigned: ``w2 + 12`` in [0, 24]).
ZP = 12
_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # numerics.mxfp4.E2M1_X2
#: The 16-entry decode table: E2M1 code -> ``2·value + ZP``.
E2M1_X2_ZP = tuple(v + ZP for v in _X2)

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


#: Largest token count of one sub-tile per ISA (VNNI: 32 zmm hold a float and one or two
#: int32 accumulators per token and unit; AVX2: token-major blocks keep a unit's 8 decoded
#: vectors and one token's sums live, the float accumulators spill past ~5 tokens, and one
#: group of 8 still beats groups of at most 3 / 4 / 12 that decode every nibble again).
TS_MAX = {"vnni": 12, "avx2": 8}
#: Channels per register unit per ISA.
UNIT = {"vnni": 16, "avx2": 8}


def w4_units(isa: str, ts: int) -> int:
    """Register units (of :data:`UNIT` channels) per sub-tile of ``ts`` tokens: VNNI 4 for
    ``ts == 1`` (all four 16-channel streams of a 64-column chunk interleaved, so twice the
    DRAM lines are in flight at T=1), 2 for ``ts <= 4``, else 1; AVX2 4 for ``ts == 1`` (two
    16-channel streams, both halves of each line), 2 for ``ts == 2`` (both halves of each
    line in one pass: T=2 ~20 % faster than 1 unit, measured on Zen 3; 2 units at T=3-8 and
    4 at T=2-3 were not better), else 1."""
    if isa not in UNIT:
        raise ValueError(f"unknown ISA {isa!r} (expected 'vnni' or 'avx2')")
    if isa != "vnni":
        return 4 if ts == 1 else (2 if ts == 2 else 1)
    return 4 if ts == 1 else (2 if ts <= 4 else 1)


def w4_prefetch(isa: str, ts: int) -> int:
    """Software-prefetch distance (bytes ahead in each nibble stream; the scale stream a
    quarter of it, it advances 64 B per block to the streams' 256 B) of a sub-tile of ``ts``
    tokens: VNNI 2048 for ``ts == 1`` (``prefetcht1`` of the first of the 4 lines per block),
    else 4096 (``prefetcht0``, all 4 lines); AVX2 1024 for ``ts == 1`` (``prefetcht1``, all 4
    lines of each of its 2 streams), else 2048 (``prefetcht0``, all 4 lines). Measured on
    the 2-core Zen 5 and Zen 4 guests (VNNI) and Zen 3 (AVX2), weights streaming from DRAM
    (``benchmarks/bench_w4a8.py``, ``docs/performance.md``)."""
    if isa not in UNIT:
        raise ValueError(f"unknown ISA {isa!r} (expected 'vnni' or 'avx2')")
    if isa != "vnni":
        return 1024 if ts == 1 else 2048
    return 2048 if ts == 1 else 4096


def w4_plan(isa: str, tt: int) -> list[tuple[int, int, int, int]]:
    """Sub-tiles ``(t0, ts, u0, us)`` of a ``tt x 64`` tile, units-major (the order of
    :mod:`.gemm_mxfp4`'s loop): the fewest token groups of at most :data:`TS_MAX` tokens,
    sizes differing by at most one (largest first), and :func:`w4_units` units each."""
    groups = -(-tt // TS_MAX[isa])
    q, r = divmod(tt, groups)
    sizes = [q + 1] * r + [q] * (groups - r)
    starts = [sum(sizes[:i]) for i in range(groups)]
    us = w4_units(isa, sizes[0])
    return [(t0, ts, u0, us) for u0 in range(0, 64 // UNIT[isa], us) for t0, ts in zip(starts, sizes)]


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@cache
def _tile(isa: str, ts0: int, us0: int):
    W = 16 if isa == "vnni" else 8          # int32 / float lanes per register
    VB = 4 * W                              # weight bytes per register (64 / 32)
    upb = 64 // VB                          # units per 16-channel weight block
    VI8, VI32, VF = ir.VectorType(_I8, VB), ir.VectorType(_I32, W), ir.VectorType(_F32, W)
    VI16 = ir.VectorType(_I16, 2 * W)
    plan = [(0, ts0, 0, us0)]
    pfd = w4_prefetch(isa, ts0)             # bytes ahead in each nibble stream (0: none)
    pfl = 2 if ts0 == 1 else 3              # llvm.prefetch locality: 2 = prefetcht1 (L2), 3 = prefetcht0
    tmajor = isa == "avx2" and ts0 > 1        # AVX2 token-major blocks (see the module docstring)

    def codegen(context, builder, sig, args):
        (xa, x_off, x_ks, wa, w_off, w_bs, ng, swa, sw_off, sxa, ca, sc_off, sc_ts, fa, f_off, f_ts, accum) = args
        i8p = _I8.as_pointer()
        b = builder

        def data(i, v):
            return b.bitcast(context.make_array(sig.args[i])(context, b, v).data, i8p)

        xptr, wptr, swptr, sxptr, cptr, fptr = (data(0, xa), data(3, wa), data(7, swa), data(9, sxa),
                                                 data(10, ca), data(13, fa))
        k = lambda v, t=_I64: ir.Constant(t, v)  # noqa: E731
        flag = accum if accum.type == _I1 else b.icmp_unsigned("!=", accum, ir.Constant(accum.type, 0))
        x_base = b.gep(xptr, [x_off])
        tab = ir.Constant(VI8, [E2M1_X2_ZP[i % 16] for i in range(VB)])
        m15 = ir.Constant(VI8, [15] * VB)
        four = ir.Constant(VI8, [4] * VB)
        zf = ir.Constant(VF, [0.0] * W)
        zi = ir.Constant(VI32, [0] * W)
        if isa == "vnni":
            shuf = _fn(b, "llvm.x86.avx512.pshuf.b.512", VI8, [VI8, VI8])
            dot = _fn(b, "llvm.x86.avx512.vpdpbusd.512", VI32, [VI32, VI32, VI32])
            # vscalefps a·2^floor(b) (b = e - 128, exact): correctly rounded, as fl(a · 2^(e-128))
            scalef = _fn(b, "llvm.x86.avx512.mask.scalef.ps.512", VF, [VF, VF, VF, _I16, _I32])
        else:
            shuf = _fn(b, "llvm.x86.avx2.pshuf.b", VI8, [VI8, VI8])
            maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", VI16, [VI8, VI8])
            maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", VI32, [VI16, VI16])
            ones = ir.Constant(VI16, [1] * (2 * W))

        def load(ptr, off, ty):
            return b.load(b.bitcast(b.gep(ptr, [off]), ty.as_pointer()), align=1)

        def bcast_x(kg, t):
            s = load(x_base, b.add(b.mul(kg, x_ks), k(4 * t)), _I32)
            v = b.insert_element(ir.Constant(VI32, None), s, k(0, _I32))
            return b.bitcast(b.shuffle_vector(v, ir.Constant(VI32, None), ir.Constant(VI32, [0] * W)), VI8)

        def bcast_sc(ptr, idx, ty, vty):
            s = load(ptr, b.mul(k(4), idx), ty)
            v = b.insert_element(ir.Constant(vty, None), s, k(0, _I32))
            return b.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(VI32, [0] * W))

        for (t0, ts, u0, us) in plan:
            units = list(range(u0, u0 + us))
            toks = list(range(t0, t0 + ts))
            # two int32 chains (lo / hi nibbles) for 2-4 register units of ts >= 2; T=1 (4 units, 4
            # chains already) one: its 4 merges per block cost more than the latency (measured)
            split = isa == "vnni" and ts * us <= 4 and ts > 1
            w_bases = {u: b.gep(wptr, [b.add(w_off, b.add(b.mul(w_bs, k(u // upb)), k(VB * (u % upb))))])
                       for u in units}
            f_offs = {(t, u): b.mul(k(4), b.add(f_off, b.add(b.mul(f_ts, k(t)), k(W * u))))
                      for t in toks for u in units}
            keys = list(f_offs)
            finit = [b.select(flag, load(fptr, f_offs[key], VF), zf) for key in keys]
            pf = _fn(b, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, _I32, _I32, _I32]) if pfd else None

            def block(g, fcur, units=units, toks=toks, split=split, w_bases=w_bases, keys=keys, pf=pf):
                if pf is not None:   # prefetch of the block pfd bytes ahead: 4 lines per stream (T=1 VNNI: the
                    # first; the hardware prefetcher fetches the rest), 1 of scales; AVX2 units share lines
                    for u in [u for u in units if u % upb == 0 or u == units[0]]:
                        for ln in range(0, 64 if ts == 1 and isa == "vnni" else 256, 64):
                            b.call(pf, [b.gep(w_bases[u], [b.add(b.mul(g, k(256)), k(pfd + ln))]),
                                        k(0, _I32), k(pfl, _I32), k(1, _I32)])
                    b.call(pf, [b.gep(swptr, [b.add(sw_off, b.add(b.mul(g, k(64)), k(pfd // 4)))]),
                                k(0, _I32), k(pfl, _I32), k(1, _I32)])
                fnew = {}
                fold_in = dict(zip(keys, fcur))
                isum = {}

                def scale_vec(u):
                    """The unit's UE8M0 scales of block g: VNNI the float e - 128 (for vscalefps),
                    AVX2 the exact float32 2^(e-128), as bits max((e-1)·2^23, (e+1)·2^21) (the
                    second wins only for e <= 1: the subnormals 2^-128 = 2^21, 2^-127 = 2^22)."""
                    e = b.zext(load(swptr, b.add(sw_off, b.add(b.mul(g, k(64)), k(W * u))), ir.VectorType(_I8, W)),
                               VI32)
                    if isa == "vnni":
                        return b.sitofp(b.sub(e, ir.Constant(VI32, [128] * W)), VF)
                    normal = b.sub(b.shl(e, ir.Constant(VI32, [23] * W)), ir.Constant(VI32, [1 << 23] * W))
                    sub = b.add(b.shl(e, ir.Constant(VI32, [21] * W)), ir.Constant(VI32, [1 << 21] * W))
                    return b.bitcast(b.select(b.icmp_signed(">", normal, sub), normal, sub), VF)

                def fold(t, u, swv):
                    """fl(f + fl(fl(f32(isum - c)·s)·2^(e-128))) of token t, unit u."""
                    sc = b.add(sc_off, b.add(b.mul(sc_ts, k(t)), g))
                    sv = bcast_sc(sxptr, sc, _F32, VF)
                    iv = isum[(t, u)] if isa == "vnni" else b.add(isum[(t, u)], bcast_sc(cptr, sc, _I32, VI32))
                    y = b.fmul(b.sitofp(iv, VF), sv)
                    if isa == "vnni":
                        z = b.call(scalef, [y, swv, zf, k(-1, _I16), k(4, _I32)])
                    else:
                        z = b.fmul(y, swv)
                    fnew[(t, u)] = b.fadd(fold_in[(t, u)], z)

                for u in units:
                    if tmajor:  # AVX2, ts >= 2: decode the unit's 4 nibble blocks, then token by token
                        dw = []
                        for p in range(4):
                            v = load(w_bases[u], b.mul(b.add(b.mul(g, k(4)), k(p)), k(64)), VI8)
                            dw.append((b.call(shuf, [tab, b.and_(v, m15)]),
                                       b.call(shuf, [tab, b.and_(b.lshr(v, four), m15)])))
                        swv = scale_vec(u)
                        for t in toks:
                            s16t = None
                            for p, (lo, hi) in enumerate(dw):
                                kg = b.add(b.mul(g, k(8)), k(2 * p))
                                xlo, xhi = bcast_x(kg, t), bcast_x(b.add(kg, k(1)), t)
                                pr = b.add(b.call(maddubs, [lo, xlo]), b.call(maddubs, [hi, xhi]))
                                s16t = pr if p % 2 == 0 else b.add(s16t, pr)
                                if p % 2 == 1:
                                    w32 = b.call(maddwd, [s16t, ones])
                                    isum[(t, u)] = w32 if p == 1 else b.add(isum[(t, u)], w32)
                            fold(t, u, swv)
                        continue
                    # VNNI: chain 0 starts from corr = -ZP·Σq (broadcast): no subtraction in the fold
                    ch = [[bcast_sc(cptr, b.add(sc_off, b.add(b.mul(sc_ts, k(t)), g)), _I32, VI32), zi]
                          for t in toks] if isa == "vnni" else None
                    s16 = [None] * len(toks)
                    for p in range(4):
                        woff = b.mul(b.add(b.mul(g, k(4)), k(p)), k(64))
                        v = load(w_bases[u], woff, VI8)
                        lo = b.call(shuf, [tab, b.and_(v, m15)])
                        hi = b.call(shuf, [tab, b.and_(b.lshr(v, four), m15)])
                        kg = b.add(b.mul(g, k(8)), k(2 * p))
                        for i, t in enumerate(toks):
                            xlo, xhi = bcast_x(kg, t), bcast_x(b.add(kg, k(1)), t)
                            if isa == "vnni":
                                c0 = b.call(dot, [ch[i][0], b.bitcast(lo, VI32), b.bitcast(xlo, VI32)])
                                j = 1 if split else 0
                                ch[i][0] = c0
                                ch[i][j] = b.call(dot, [ch[i][j], b.bitcast(hi, VI32), b.bitcast(xhi, VI32)])
                            else:
                                pr = b.add(b.call(maddubs, [lo, xlo]), b.call(maddubs, [hi, xhi]))
                                s16[i] = pr if p % 2 == 0 else b.add(s16[i], pr)
                                if p % 2 == 1:
                                    w32 = b.call(maddwd, [s16[i], ones])
                                    isum[(t, u)] = w32 if p == 1 else b.add(isum[(t, u)], w32)
                    if isa == "vnni":
                        for i, t in enumerate(toks):
                            isum[(t, u)] = b.add(ch[i][0], ch[i][1]) if split else ch[i][0]
                    else:  # AVX2: fold this unit now (only the float accumulators stay live across units)
                        swv = scale_vec(u)
                        for t in toks:
                            fold(t, u, swv)
                if isa == "vnni":  # after all units, tokens-major (the order the VNNI tile was tuned with)
                    swvs = {u: scale_vec(u) for u in units}
                    for t, u in keys:
                        fold(t, u, swvs[u])
                return [fnew[key] for key in keys]

            final = acc_loop(b, ng, finit, block, f"w4{isa}")
            for key, v in zip(keys, final):
                b.store(v, b.bitcast(b.gep(fptr, [f_offs[key]]), VF.as_pointer()), align=1)
        return context.get_dummy_value()

    @intrinsic
    def _t(typingctx, xp, x_off, x_ks, wp, w_off, w_bs, ng, sw, sw_off, sx, corr, sc_off, sc_ts, facc, f_off,
           f_ts, accumulate):
        for a, dt in ((xp, types.int8), (wp, types.uint8), (sw, types.uint8), (sx, types.float32),
                      (corr, types.int32), (facc, types.float32)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != 1:
                return None
        ip = types.intp
        sig = types.void(xp, ip, ip, wp, ip, ip, ip, sw, ip, sx, corr, ip, ip, facc, ip, ip, types.boolean)
        return sig, codegen

    _t.__name__ = f"w4_tile_{isa}_{ts0}x{us0}{f'_pf{pfd}l{pfl}' if pfd else ''}{'_tm' if tmajor else ''}_v4"
    return _t


def w4_tile(ts: int, isa: str | None = None):
    """The W4A8 sub-tile intrinsic of ``ts`` tokens x :func:`w4_units` units (of
    :data:`UNIT` channels) of ``isa`` (default: this process's :data:`jit.INT8_TILE`; a CPU
    without either gets the VNNI object, never compiled: no kernel calls it there). The
    caller offsets ``x_off``/``sc_off``/``f_off`` to its first token and ``w_off``/``sw_off``/
    ``f_off`` to its first unit. Cached per argument tuple. Raises ValueError for an unknown
    ISA."""
    isa = isa if isa is not None else tile_isa()
    return _tile(isa, int(ts), w4_units(isa, int(ts)))


def tile_isa() -> str:
    """This process's W4A8 tile ISA: ``"avx2"`` when :data:`jit.INT8_TILE` is, else ``"vnni"``."""
    return "avx2" if jit.INT8_TILE == "avx2" else "vnni"
