"""Load-time passes over whole weights, in parallel Numba sweeps: the NaN/Inf count of a float
tensor and the INT8 quantisation (per output channel, or per block of G inputs) of a bf16 /
float32 weight.

Both replace torch passes that dominated loading a checkpoint (a Flash-dims 3-layer model,
5.4 GB of bf16: ``torch.isfinite(...).all()`` and the 7 torch passes of
:func:`llm_kernels.numerics.quant.quantize_weight` took ~80 % of a 42 s load).

* :func:`count_nonfinite`: counts elements whose exponent bits are all ones (NaN or Inf) on
  the raw bits of an F16 / BF16 / F32 tensor; integer sums, so the count is exact.
* :func:`quantize_weight_grouped_fast`: bit-identical to the golden
  :func:`~llm_kernels.numerics.group_quant.quantize_weight_grouped`: the block ``amax``
  (clamped at ``fl(1e-4)``) in one parallel pass, the float16 scales from it by the
  golden's own :func:`~llm_kernels.numerics.group_quant.f16_scale` (torch, 1/G of the
  elements), then ``q = clamp(rint(fl(w / scale)), ±127)`` in a second parallel pass.
* :func:`quantize_weight_fast`: bit-identical to the golden
  :func:`~llm_kernels.numerics.quant.quantize_weight` (``amax = max|w[n]|`` clamped at
  ``fl(1e-4)``, ``q = clamp(rint(fl(w · fl(fl(1/amax) · 127))), ±127)`` — torch computes
  ``127 / amax`` as ``amax.reciprocal() * 127`` — and ``scale = fl(amax / 127)``), one row
  per ``prange`` iteration; ``max |w|`` is taken as an integer max over the bit patterns
  with the sign cleared (the same value; the loop vectorises). Rows holding NaN or Inf,
  and dtypes other than bf16 / float32, go to the golden itself. Tested bitwise against it (``tests/kernels/common/test_weight_quant.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ...numerics.group_quant import GroupQuantWeight, f16_scale, quantize_weight_grouped
from ...numerics.quant import AMAX_EPS, INT8_MAX, QuantWeight, quantize_weight
from .bf16 import f32_from_bits
from .jit import njit_kernel

__all__ = ["count_nonfinite", "quantize_weight_fast", "quantize_weight_grouped_fast"]

_EXP_MASK = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_BLOCK = 1 << 16  # elements per parallel iteration of the count


@njit_kernel(parallel=True)
def _count_exp_ones(bits, mask):
    """Elements of ``bits`` (int16 / int32 view of a float tensor, 1-D) whose exponent field
    ``mask`` is all ones."""
    n = bits.size
    nb = (n + _BLOCK - 1) // _BLOCK
    total = 0
    for b in prange(nb):
        lo = b * _BLOCK
        blk = bits[lo:min(n, lo + _BLOCK)]
        c = 0
        for i in range(blk.size):
            c += 1 if (blk[i] & mask) == mask else 0
        total += c
    return total


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN + Inf elements of a float16 / bfloat16 / float32 CPU tensor (any shape, any
    strides: a non-contiguous tensor is copied once). Raises TypeError for another dtype."""
    if t.dtype not in _EXP_MASK:
        raise TypeError(f"count_nonfinite: expected float16, bfloat16 or float32, got {t.dtype}")
    if t.numel() == 0:
        return 0
    bits = t.detach().contiguous().view(_BITS[t.dtype]).reshape(-1).numpy()
    mask = _EXP_MASK[t.dtype]
    return int(_count_exp_ones(bits, (np.int32 if t.dtype == torch.float32 else np.int16)(mask)))


def _bit_rows(w: torch.Tensor) -> np.ndarray:
    """The bit patterns of a bf16 (int16) or float32 (int32) 2-D weight, C-contiguous numpy."""
    return w.detach().contiguous().view(torch.int16 if w.dtype == torch.bfloat16 else torch.int32).numpy()


@njit_kernel
def _f32(b, bf16):
    """float32 of the bits ``b`` (an int16 bf16 pattern widened, or an int32 float32 pattern)."""
    if bf16:
        return f32_from_bits(np.int32(b) << np.int32(16))
    return f32_from_bits(np.int32(b))


@njit_kernel
def _mag_max(bits, bf16):
    """Largest magnitude bit pattern (sign cleared) of ``bits`` (1-D int16 bf16 / int32 float32
    patterns): for non-negative floats the integer order is the value order, so this is
    ``max |v|``'s pattern; NaN and Inf give one at or above the exponent mask. An integer
    max loop, which vectorises."""
    m = np.int32(0)
    if bf16:
        for i in range(bits.size):
            m = max(m, np.int32(bits[i]) & np.int32(0x7FFF))
    else:
        for i in range(bits.size):
            m = max(m, np.int32(bits[i]) & np.int32(0x7FFFFFFF))
    return m


@njit_kernel(parallel=True)
def _quant_rows(w, bf16, eps, q, s, bad):
    """Per row of ``w`` [n, k] (int16 bf16 / int32 float32 bit patterns): the golden recipe
    (module docstring) into ``q`` [n, k] int8 and ``s`` [n] float32; ``bad[r] = 1`` when
    the row holds a NaN or Inf (its outputs are then left for the golden)."""
    n, k = w.shape
    lim = np.float32(INT8_MAX)
    top = np.int32(0x7F80) if bf16 else np.int32(0x7F800000)
    for r in prange(n):
        row = w[r]
        m = _mag_max(row, bf16)
        if m >= top:
            bad[r] = 1
            continue
        amax = _f32(m, bf16)
        if amax < eps:
            amax = eps
        inv = np.float32(np.float32(np.float32(1.0) / amax) * lim)
        qr = q[r]
        for i in range(k):
            x = np.rint(np.float32(_f32(row[i], bf16) * inv))
            qr[i] = np.int8(min(max(x, -lim), lim))
        s[r] = np.float32(amax / lim)


def quantize_weight_fast(w: torch.Tensor) -> QuantWeight:
    """:func:`~llm_kernels.numerics.quant.quantize_weight` of ``w`` [out, in], bit for bit,
    in one parallel pass (bf16 / float32 weights; any other dtype, or a weight holding NaN,
    runs the golden). Raises ValueError for a non-2-D weight, like the golden."""
    if w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float32) or w.numel() == 0:
        return quantize_weight(w)
    n, k = w.shape
    arr = _bit_rows(w)
    q = np.empty((n, k), np.int8)
    s = np.empty(n, np.float32)
    bad = np.zeros(n, np.uint8)
    _quant_rows(arr, w.dtype == torch.bfloat16, np.float32(AMAX_EPS), q, s, bad)
    if bad.any():
        return quantize_weight(w)
    return QuantWeight(torch.from_numpy(q), torch.from_numpy(s))


@njit_kernel(parallel=True)
def _group_amax(w, bf16, G, eps, amax, bad):
    """``amax[r, g] = max(max |w[r, gG:(g+1)G]|, eps)`` (``w``: int16 bf16 / int32 float32
    bit patterns); ``bad[r] = 1`` for a row with NaN or Inf."""
    n, k = w.shape
    ng = k // G
    top = np.int32(0x7F80) if bf16 else np.int32(0x7F800000)
    for r in prange(n):
        row = w[r]
        for g in range(ng):
            m = _mag_max(row[g * G:(g + 1) * G], bf16)
            if m >= top:
                bad[r] = 1
            a = _f32(m, bf16)
            amax[r, g] = a if a >= eps else eps


@njit_kernel(parallel=True)
def _group_q(w, bf16, G, sc, q):
    """``q[r, i] = clamp(rint(fl(w[r, i] / sc[r, i // G])), ±127)`` (float32 division)."""
    n, k = w.shape
    ng = k // G
    lim = np.float32(INT8_MAX)
    for r in prange(n):
        row = w[r]
        qr = q[r]
        for g in range(ng):
            sg = sc[r, g]
            blk = row[g * G:(g + 1) * G]
            qb = qr[g * G:(g + 1) * G]
            for i in range(G):
                x = np.rint(np.float32(_f32(blk[i], bf16) / sg))
                qb[i] = np.int8(min(max(x, -lim), lim))


def quantize_weight_grouped_fast(w: torch.Tensor, group_size: int) -> GroupQuantWeight:
    """:func:`~llm_kernels.numerics.group_quant.quantize_weight_grouped` of ``w`` [out, in],
    bit for bit (bf16 / float32 weights; other dtypes and weights holding NaN run the
    golden, which also raises its ValueError for a bad shape or group size)."""
    if (w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float32) or w.numel() == 0
            or group_size <= 0 or group_size % 4 or w.shape[1] % group_size):
        return quantize_weight_grouped(w, group_size)
    n, k = w.shape
    bf = w.dtype == torch.bfloat16
    arr = _bit_rows(w)
    amax = np.empty((n, k // group_size), np.float32)
    bad = np.zeros(n, np.uint8)
    _group_amax(arr, bf, group_size, np.float32(AMAX_EPS), amax, bad)
    if bad.any():
        return quantize_weight_grouped(w, group_size)
    sc = f16_scale(torch.from_numpy(amax))
    q = np.empty((n, k), np.int8)
    _group_q(arr, bf, group_size, sc.float().numpy(), q)
    return GroupQuantWeight(torch.from_numpy(q), sc.contiguous(), group_size)
