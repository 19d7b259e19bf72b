"""Scalar float32 math for Numba kernels that must match torch's vectorised CPU ops bitwise.

* ``fma32``: ``a·b + c`` with one rounding (``llvm.fma.f32``; vectorisable).
* ``sleef_expf``: SLEEF ``xexpf`` (u10, FMA form), which torch's AVX-512 ``exp`` (softmax,
  SiLU) runs.
* ``tree16``: torch's AVX-512 ``vec_reduce_all`` lane order for a 16-lane ``+`` reduction.

Used by the DeepSeek-V4 sparse attention / MoE kernels and the Qwen3 SwiGLU epilogue.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .bf16 import f32_from_bits
from .jit import njit_kernel

__all__ = ["fma32", "sleef_expf", "tree16"]


@intrinsic
def fma32(typingctx, a, b, c):
    """Fused multiply-add ``a·b + c`` with one rounding (``llvm.fma.f32``; vectorisable)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]),
                                            "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


# SLEEF ``xexpf`` (u10) constants: what torch's AVX-512 ``Vectorized<float>::exp`` runs.
_R_LN2F = np.float32(1.442695040888963407359924681001892137426645954152985934135449406931)
_L2UF = np.float32(-0.693145751953125)
_L2LF = np.float32(-1.428606765330187045e-06)
_EXP_C = (np.float32(0.000198527617612853646278381), np.float32(0.00139304355252534151077271),
          np.float32(0.00833336077630519866943359), np.float32(0.0416664853692054748535156),
          np.float32(0.166666671633720397949219), np.float32(0.5))
_EC0, _EC1, _EC2, _EC3, _EC4, _EC5 = _EXP_C


@njit_kernel
def sleef_expf(d):
    """float32 ``exp(d)`` bit-identical to SLEEF's ``xexpf`` with FMA (torch's vectorised
    ``exp`` inside ``softmax`` on AVX-512): ``q = rint(d·(1/ln2))``, two-step Cody-Waite
    reduction and the degree-6 polynomial by FMAs, ``u·2^(q>>1)·2^(q-(q>>1))``; ``d < -104``
    (incl. -inf) -> 0, ``d > 100`` -> inf. Vectorisable (no libm call)."""
    x = min(max(d, np.float32(-105.0)), np.float32(101.0))
    qf = np.float32(np.rint(np.float32(x * _R_LN2F)))
    q = np.int32(qf)
    s = fma32(qf, _L2UF, x)
    s = fma32(qf, _L2LF, s)
    u = _EC0
    u = fma32(u, s, _EC1)
    u = fma32(u, s, _EC2)
    u = fma32(u, s, _EC3)
    u = fma32(u, s, _EC4)
    u = fma32(u, s, _EC5)
    u = np.float32(np.float32(1.0) + fma32(np.float32(s * s), u, s))
    h = q >> np.int32(1)
    u = np.float32(u * f32_from_bits(np.uint32(np.int32(h + np.int32(127)) << np.int32(23))))
    u = np.float32(u * f32_from_bits(np.uint32(np.int32(q - h + np.int32(127)) << np.int32(23))))
    if d < np.float32(-104.0):
        return np.float32(0.0)
    if d > np.float32(100.0):
        return np.float32(np.inf)
    return u


@njit_kernel
def tree16(lanes):
    """torch's AVX-512 ``vec_reduce_all`` of 16 lanes for ``+``: halves at distance 8, 4,
    2, 1 (lane 0 of the shuffle reduction)."""
    w = np.empty(8, np.float32)
    for i in range(8):
        w[i] = np.float32(lanes[i] + lanes[i + 8])
    for i in range(4):
        w[i] = np.float32(w[i] + w[i + 4])
    for i in range(2):
        w[i] = np.float32(w[i] + w[i + 2])
    return np.float32(w[0] + w[1])
