"""Fused RMSNorm (optional weight) + interleaved RoPE on the trailing rope lanes.

Golden: ``llm_kernels/reference/deepseek_v4/common.py`` — ``rms_norm`` then ``apply_rope``
(spec ``shared/design/deepseek_v4_architecture.md`` §0.3, §5.3)::

    r  = rsqrt(mean(x²) + eps)                          # float32, per row of D
    n  = w * (x * r)        (weighted)     |  x * rnd(r)  (unweighted)
    n  = rnd(n)                                           # storage dtype rounding
    pair i of the trailing rd = 2·len(cos) lanes: (e, o) = (n[D-rd+2i], n[D-rd+2i+1])
    e' = e·cos_i − o·s_i ,  o' = o·cos_i + e·s_i          # s = −sin if inverse else sin
    y  = rnd(concat(n[:D-rd], rot))

``rnd`` rounds to bf16 (round-to-nearest-even) when the output dtype is bf16 and is the
identity for float32, so a bf16 run reproduces every rounding point of the reference. All
arithmetic is float32 with the reference's operation order (products rounded before the
subtraction; no FMA contraction; ``rsqrt`` as ``1/sqrt``), and ``Σ x²`` is accumulated in
the exact order of torch's AVX-512 CPU sum kernel (see ``sumsq_torch_order``), so on this torch build
the result is normally bitwise equal to the reference. The contract is looser (float32:
a few ulp of the row's magnitude; bf16: at most 1 bf16 ulp), so a torch change of its
reduction order only costs rounding-level differences.

Rows are independent and each is owned by one ``prange`` iteration (deterministic).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import prange

from .bf16 import as_kernel_input, f32_to_bf16_bits, load_f32, u16_as_torch_bf16
from .jit import njit_kernel, sized

__all__ = ["apply_rope", "ceil_log2", "rms_norm", "rms_norm_rope", "rms_norm_rows_f32", "sumsq_torch_order"]

_ONE = np.float32(1.0)


_LANES = 8  # lanes of the vector accumulator in torch's sum kernel (measured: 8 on torch 2.13 AVX-512)
_ILP = 4
_LEVELS = 4


@njit_kernel
def ceil_log2(x):
    """``max(1, ceil(log2(x)))`` for a positive int (ATen's ``ceil_log2`` as used by the
    cascade sums of ``SumKernel.cpp``)."""
    if x <= 2:
        return 1
    n = 0
    v = x - 1
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit_kernel
def sumsq_torch_order(buf, acc):
    """``Σ buf[i]²`` (squares rounded to fp32 first) in exactly the order of torch's CPU
    ``sum`` over a contiguous last dim (ATen ``SumKernel.cpp``: ``vectorized_inner_sum`` ->
    ``row_sum`` with 4-way ILP -> ``multi_row_sum`` 4-level cascade over 8-lane vectors,
    then the tail vectors into ILP slot 0, the 4 ILP slots left to right, the scalar
    tail, then the 8 lanes left to right), so the RMS factor is bitwise equal to the
    reference's ``x.pow(2).mean(-1)`` on this torch build (verified for D from 3 to 2^20).
    Rows shorter than one vector use the scalar ``row_sum`` order.

    The 4 ILP slots x 8 lanes are laid out as one 32-float "row" so the hot loop is a
    plain column sum over ``[D/32, 32]`` that LLVM vectorises. ``acc`` is float32 scratch
    ``[4, 32]`` (one row per cascade level)."""
    D = buf.size
    L = _LANES
    W = acc.shape[1]  # = _ILP * L; a runtime trip count lets LLVM vectorise with alias checks
    if D < L:
        p = acc[0]
        for k in range(_ILP):
            p[k] = np.float32(0.0)
        n4 = D // _ILP
        for i in range(n4):
            for k in range(_ILP):
                v = buf[i * _ILP + k]
                p[k] += np.float32(v * v)
        for i in range(n4 * _ILP, D):
            v = buf[i]
            p[0] += np.float32(v * v)
        s = p[0]
        for k in range(1, _ILP):
            s += p[k]
        return np.float32(np.float32(0.0) + s)
    vec_num = D // L
    size_ilp = vec_num // _ILP
    lp = max(4, ceil_log2(size_ilp) // _LEVELS)
    step = 1 << lp
    lmask = step - 1
    a0 = acc[0]
    a1 = acc[1]
    a2 = acc[2]
    a3 = acc[3]
    for j in range(W):
        a0[j] = np.float32(0.0)
        a1[j] = np.float32(0.0)
        a2[j] = np.float32(0.0)
        a3[j] = np.float32(0.0)
    i = 0
    while i + step <= size_ilp:
        for ii in range(i, i + step):
            row = buf[ii * W:ii * W + W]
            for j in range(W):
                v = row[j]
                a0[j] += np.float32(v * v)
        i += step
        for j in range(W):  # cascade: level 1 <- 0, continue while the level wrapped
            a1[j] += a0[j]
            a0[j] = np.float32(0.0)
        if (i & (lmask << lp)) == 0:
            for j in range(W):
                a2[j] += a1[j]
                a1[j] = np.float32(0.0)
            if (i & (lmask << (2 * lp))) == 0:
                for j in range(W):
                    a3[j] += a2[j]
                    a2[j] = np.float32(0.0)
    for ii in range(i, size_ilp):
        row = buf[ii * W:ii * W + W]
        for j in range(W):
            v = row[j]
            a0[j] += np.float32(v * v)
    for j in range(W):
        a0[j] += a1[j]
    for j in range(W):
        a0[j] += a2[j]
    for j in range(W):
        a0[j] += a3[j]
    for r in range(size_ilp * _ILP, vec_num):  # leftover vectors -> ILP slot 0
        for l in range(L):
            v = buf[r * L + l]
            a0[l] += np.float32(v * v)
    for k in range(1, _ILP):
        for l in range(L):
            a0[l] += a0[k * L + l]
    s = np.float32(0.0)
    for i2 in range(vec_num * L, D):
        v = buf[i2]
        s += np.float32(v * v)
    for l in range(L):
        s += a0[l]
    return s


@njit_kernel
def _rnd(v, to_bf16):
    if to_bf16:
        return np.float32(load_f32(f32_to_bf16_bits(v)))
    return v


@njit_kernel
def _norm_rope_row(xr, w, has_w, cos, sin, t, eps, do_norm, do_rope, inverse, to_bf16, f32_out, buf, acc,
                   orow_f, orow_h):
    D = buf.size
    half = cos.shape[1]
    nope = D - 2 * half
    for i in range(D):
        buf[i] = load_f32(xr[i])
    if do_norm:
        ms = np.float32(sumsq_torch_order(buf, acc) / np.float32(D))
        rs = np.float32(_ONE / np.float32(np.sqrt(np.float32(ms + eps))))
        if has_w:
            if to_bf16:
                for i in range(D):
                    buf[i] = _rnd(np.float32(w[i] * np.float32(buf[i] * rs)), True)
            else:
                for i in range(D):
                    buf[i] = np.float32(w[i] * np.float32(buf[i] * rs))
        else:
            rr = _rnd(rs, to_bf16)
            if to_bf16:
                for i in range(D):
                    buf[i] = _rnd(np.float32(buf[i] * rr), True)
            else:
                for i in range(D):
                    buf[i] = np.float32(buf[i] * rr)
    if do_rope:
        cr = cos[t]
        sr = sin[t]
        rot = buf[nope:]
        for i in range(half):
            c = cr[i]
            s = -sr[i] if inverse else sr[i]
            e = rot[2 * i]
            o = rot[2 * i + 1]
            rot[2 * i] = np.float32(np.float32(e * c) - np.float32(o * s))
            rot[2 * i + 1] = np.float32(np.float32(o * c) + np.float32(e * s))
    if to_bf16 and f32_out:  # bf16 values widened to float32 (the torch ``.float()`` of the bits)
        for i in range(D):
            orow_f[i] = _rnd(buf[i], True)
    elif to_bf16:
        for i in range(D):
            orow_h[i] = f32_to_bf16_bits(buf[i])
    else:
        for i in range(D):
            orow_f[i] = buf[i]


@njit_kernel(parallel=True)
def _norm_rope_kernel(x, w, has_w, cos, sin, H, eps, do_norm, do_rope, inverse, to_bf16, f32_out,
                      out_f32, out_u16):
    """prange over blocks of rows (scratch allocated once per block, not per row); each
    row is independent, so the split does not affect the result. ``to_bf16`` with
    ``f32_out`` writes the bf16 values widened into ``out_f32``."""
    R, D = x.shape
    nblk = min(R, 64)
    for b in prange(nblk):
        r0 = b * R // nblk
        r1 = (b + 1) * R // nblk
        buf = np.empty(D, np.float32)
        acc = np.empty((_LEVELS, _ILP * _LANES), np.float32)
        for r in range(r0, r1):
            orow_f = out_f32[r] if (not to_bf16 or f32_out) else out_f32[0]
            orow_h = out_u16[r] if (to_bf16 and not f32_out) else out_u16[0]
            _norm_rope_row(x[r], w, has_w, cos, sin, r // H if do_rope else 0, eps, do_norm,
                           do_rope, inverse, to_bf16, f32_out, buf, acc, orow_f, orow_h)


def _f32_vec(a: Any, name: str) -> np.ndarray:
    arr, is_bf16 = as_kernel_input(a, name)
    if is_bf16:
        arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


def rms_norm_rope(x: Any, weight: Any | None = None, cos: Any | None = None,
                  sin: Any | None = None, eps: float = 1e-6, *, inverse: bool = False,
                  out_dtype: Any = None, norm: bool = True) -> Any:
    """Fused RMSNorm + interleaved RoPE (see the module docstring for the formula).

    Args:
        x: ``[..., D]`` activations: float32/bfloat16 CPU torch tensor, numpy float32, or
            numpy uint16 (bf16 bits).
        weight: optional ``[D]`` RMSNorm gain (float32 or bf16; ``None`` = unweighted).
        cos, sin: optional ``[*L, rd/2]`` float32 tables (``rope_cos_sin``), where ``*L``
            are the leading dims of ``x`` (one table row per row of ``x``) or a prefix of
            them (broadcast over the remaining dims, e.g. x ``[T, H, D]`` with cos
            ``[T, rd/2]``). ``rd <= D``; RoPE acts on the trailing rd lanes. ``None`` skips
            RoPE.
        eps: RMSNorm epsilon. inverse: rotate by ``e^{-iθ}``.
        out_dtype: ``"float32"``/``"bfloat16"`` (or the torch/numpy dtypes); default: the
            input's dtype. bf16 output also rounds the intermediate norm output to bf16
            like the reference.
        norm: ``False`` applies RoPE only (then ``apply_rope`` semantics).

    Returns:
        ``[..., D]`` in ``out_dtype``: a torch tensor for torch input (bf16 as
        ``torch.bfloat16``), else numpy (bf16 as uint16 bits).

    Raises:
        TypeError: bad input types. ValueError: shape mismatches (weight, cos/sin, rd > D,
        odd tables) or cos without sin.
    """
    xa, x_bf16 = as_kernel_input(x, "x")
    if xa.ndim == 0:
        raise ValueError("x must have at least one dim [..., D]")
    D = xa.shape[-1]
    lead = xa.shape[:-1]
    to_bf16 = _want_bf16(out_dtype, x_bf16)
    if weight is not None:
        w = _f32_vec(weight, "weight").reshape(-1)
        if w.shape != (D,):
            raise ValueError(f"weight must be [D={D}], got {w.shape}")
    else:
        w = np.zeros(1, np.float32)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    do_rope = cos is not None
    if do_rope:
        c = _f32_vec(cos, "cos")
        s = _f32_vec(sin, "sin")
        if c.shape != s.shape or c.ndim == 0:
            raise ValueError(f"cos/sin shapes differ or are scalar: {c.shape} vs {s.shape}")
        if 2 * c.shape[-1] > D:
            raise ValueError(f"rope dim 2*{c.shape[-1]} exceeds D={D}")
        clead = c.shape[:-1]
        if tuple(lead[:len(clead)]) != tuple(clead):
            raise ValueError(f"cos/sin leading dims {clead} must be a prefix of x's {lead}")
        T = math.prod(clead)
        c2 = c.reshape(T, c.shape[-1])
        s2 = s.reshape(T, c.shape[-1])
    else:
        T = 1
        c2 = np.zeros((1, 0), np.float32)
        s2 = c2
    x2 = xa.reshape(math.prod(lead), D)
    R = x2.shape[0]
    H = max(1, R // T) if do_rope else 1
    if do_rope and T * H != R:
        raise ValueError(f"cannot broadcast cos rows {T} over {R} x-rows")
    out_f = np.empty((R, D) if not to_bf16 else (1, 1), np.float32)
    out_h = np.empty((R, D) if to_bf16 else (1, 1), np.uint16)
    if R and D:
        kernel = sized(_norm_rope_kernel, x2.size)
        kernel(x2, w, weight is not None, c2, s2, H, np.float32(eps), bool(norm),
               do_rope, bool(inverse), to_bf16, False, out_f, out_h)
    out = (out_h if to_bf16 else out_f).reshape(*lead, D) if R and D else (
        np.empty((*lead, D), np.uint16 if to_bf16 else np.float32))
    if isinstance(x, np.ndarray):
        return out
    import torch

    return u16_as_torch_bf16(out) if to_bf16 else torch.from_numpy(out)


def _want_bf16(out_dtype: Any, default: bool) -> bool:
    if out_dtype is None:
        return default
    name = str(out_dtype).replace("torch.", "")
    if name in ("bfloat16", "bf16"):
        return True
    if name in ("float32", "fp32", "<class 'numpy.float32'>"):
        return False
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype!r}")


_NO_TABLE = np.zeros((1, 0), np.float32)
_NO_U16 = np.zeros((1, 1), np.uint16)
_NO_W = np.zeros(1, np.float32)
#: :func:`rms_norm_rows_f32`'s kernel and its empty-table / empty-output arguments, for
#: fused callers that run the same norm inside their own Numba dispatch
NORM_ROPE_KERNEL, NO_TABLE, NO_U16 = _norm_rope_kernel, _NO_TABLE, _NO_U16


def rms_norm_rows_f32(x: np.ndarray, weight: np.ndarray | None, eps: float, to_bf16: bool) -> np.ndarray:
    """:func:`rms_norm` of float32 rows ``x`` [R, D] (C-contiguous numpy) with a float32
    ``weight`` [D] (or None), returned as a new float32 [R, D] array holding the values the
    ``out_dtype="bfloat16"`` path gives (rounded to bf16, widened) when ``to_bf16``, else
    the float32 result: the same kernel, without the dtype conversions around it (the
    fused decode's norm stages call it every layer). Raises ValueError for a shape mismatch."""
    if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [R, D], got {x.dtype} {x.shape}")
    R, D = x.shape
    if weight is not None and (weight.shape != (D,) or weight.dtype != np.float32):
        raise ValueError(f"weight must be float32 [D={D}], got {weight.dtype} {weight.shape}")
    out = np.empty((R, D), np.float32)
    if R and D:
        kernel = sized(_norm_rope_kernel, x.size)
        kernel(x, _NO_W if weight is None else weight, weight is not None, _NO_TABLE, _NO_TABLE, 1,
               np.float32(eps), True, False, False, bool(to_bf16), True, out, _NO_U16)
    return out


def rms_norm(x: Any, weight: Any | None, eps: float, *, out_dtype: Any = None) -> Any:
    """RMSNorm only (the golden ``rms_norm``); see :func:`rms_norm_rope`."""
    return rms_norm_rope(x, weight, None, None, eps, out_dtype=out_dtype)


def apply_rope(x: Any, cos: Any, sin: Any, *, inverse: bool = False, out_dtype: Any = None) -> Any:
    """Interleaved RoPE only (the golden ``apply_rope``); see :func:`rms_norm_rope`."""
    return rms_norm_rope(x, None, cos, sin, 0.0, inverse=inverse, out_dtype=out_dtype, norm=False)
