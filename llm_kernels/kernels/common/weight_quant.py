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
  per ``prange`` iteration. Rows holding NaN, and dtypes other than bf16 / float32, go to
  the golden itself. Tested bitwise against it (``tests/kernels/common/test_weight_quant.py``).
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


@njit_kernel
def _load(w, i, bf16):
    """Element ``i`` of row ``w`` as float32 (bf16 bits widened, or the float32 itself)."""
    if bf16:
        return f32_from_bits(np.uint32(np.uint16(w[i])) << np.uint32(16))
    return np.float32(w[i])


@njit_kernel(parallel=True)
def _quant_rows(w, bf16, eps, q, s, bad):
    """Per row of ``w`` [n, k] (int16 bf16 bits or float32): the golden recipe (module
    docstring) into ``q`` [n, k] int8 and ``s`` [n] float32; ``bad[r] = 1`` when the row
    holds a NaN (its outputs are then left for the golden)."""
    n, k = w.shape
    lim = np.float32(INT8_MAX)
    for r in prange(n):
        row = w[r]
        amax = np.float32(0.0)
        nan = False
        for i in range(k):
            v = _load(row, i, bf16)
            if v != v:
                nan = True
            a = abs(v)
            if a > amax:
                amax = a
        if nan:
            bad[r] = 1
            continue
        if amax < eps:
            amax = eps
        inv = np.float32(np.float32(np.float32(1.0) / amax) * lim)
        qr = q[r]
        for i in range(k):
            x = np.rint(np.float32(_load(row, i, bf16) * inv))
            if x > lim:
                x = lim
            elif x < -lim:
                x = -lim
            qr[i] = np.int8(x)
        s[r] = np.float32(amax / lim)


def quantize_weight_fast(w: torch.Tensor) -> QuantWeight:
    """:func:`~llm_kernels.numerics.quant.quantize_weight` of ``w`` [out, in], bit for bit,
    in one parallel pass (bf16 / float32 weights; any other dtype, or a weight holding NaN,
    runs the golden). Raises ValueError for a non-2-D weight, like the golden."""
    if w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float32) or w.numel() == 0:
        return quantize_weight(w)
    n, k = w.shape
    wc = w.detach().contiguous()
    arr = wc.view(torch.int16).numpy() if w.dtype == torch.bfloat16 else wc.numpy()
    q = np.empty((n, k), np.int8)
    s = np.empty(n, np.float32)
    bad = np.zeros(n, np.uint8)
    _quant_rows(arr, w.dtype == torch.bfloat16, np.float32(AMAX_EPS), q, s, bad)
    if bad.any():
        return quantize_weight(w)
    return QuantWeight(torch.from_numpy(q), torch.from_numpy(s))


@njit_kernel(parallel=True)
def _group_amax(w, bf16, G, eps, amax, bad):
    """``amax[r, g] = max(max |w[r, gG:(g+1)G]|, eps)``; ``bad[r] = 1`` for a row with NaN."""
    n, k = w.shape
    ng = k // G
    for r in prange(n):
        row = w[r]
        for g in range(ng):
            blk = row[g * G:(g + 1) * G]
            m = np.float32(0.0)
            for i in range(G):
                v = _load(blk, i, bf16)
                if v != v:
                    bad[r] = 1
                a = abs(v)
                if a > m:
                    m = a
            amax[r, g] = m if m >= eps else eps


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
            s = sc[r, g]
            blk = row[g * G:(g + 1) * G]
            qb = qr[g * G:(g + 1) * G]
            for i in range(G):
                x = np.rint(np.float32(_load(blk, i, bf16) / s))
                if x > lim:
                    x = lim
                elif x < -lim:
                    x = -lim
                qb[i] = np.int8(x)


def quantize_weight_grouped_fast(w: torch.Tensor, group_size: int) -> GroupQuantWeight:
    """:func:`~llm_kernels.numerics.group_quant.quantize_weight_grouped` of ``w`` [out, in],
    bit for bit (bf16 / float32 weights; other dtypes and weights holding NaN run the
    golden, which also raises its ValueError for a bad shape or group size)."""
    if (w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float32) or w.numel() == 0
            or group_size <= 0 or group_size % 4 or w.shape[1] % group_size):
        return quantize_weight_grouped(w, group_size)
    n, k = w.shape
    wc = w.detach().contiguous()
    arr = wc.view(torch.int16).numpy() if w.dtype == torch.bfloat16 else wc.numpy()
    bf = w.dtype == torch.bfloat16
    amax = np.empty((n, k // group_size), np.float32)
    bad = np.zeros(n, np.uint8)
    _group_amax(arr, bf, group_size, np.float32(AMAX_EPS), amax, bad)
    if bad.any():
        return quantize_weight_grouped(w, group_size)
    sc = f16_scale(torch.from_numpy(amax))
    q = np.empty((n, k), np.int8)
    _group_q(arr, bf, group_size, sc.float().numpy(), q)
    return GroupQuantWeight(torch.from_numpy(q), sc.contiguous(), group_size)
