"""Fused ``linear`` stage of every model: ``y = x @ wᵀ`` with the signature and numerics of
:func:`llm_kernels.numerics.linear.linear` (DeepSeek-V4's head and the ``int8`` scheme's
INT8 projections; Qwen3's head).

Dispatch (same contract as :func:`llm_kernels.numerics.linear.linear`):

* ``w`` a :class:`~llm_kernels.numerics.quant.QuantWeight`: W8A8 through
  :func:`llm_kernels.kernels.common.gemm.w8a8_linear` (per-token INT8 quantisation, exact
  INT32 VNNI GEMM, fp32 dequant ``fl(fl(acc·s_x)·s_w)`` in one Numba call), bitwise equal to
  the golden ``w8a8_linear``; the result is rounded to ``dtype``. The packed weight is the
  one prepared at load (:func:`prepare_linear`, a
  :class:`~llm_kernels.kernels.common.prepared.PackedLinear`); an unprepared
  ``QuantWeight`` is packed for the call.
* ``w`` a :class:`~llm_kernels.numerics.group_quant.GroupQuantWeight` (the ``int8_g32``
  scheme): :func:`llm_kernels.kernels.common.gemm_group.group_gemm_linear` (per-block INT8
  activations, exact block sums, the golden's block-ordered fold), bitwise equal to the
  golden ``group_linear``, rounded to ``dtype``; prepared at load as a
  :class:`~llm_kernels.kernels.common.prepared.PackedGroupLinear`.
* float ``w``: torch, exactly as the reference does (fp32 GEMM, or torch's bf16 GEMM with
  fp32 accumulation for ``dtype=bfloat16``). torch bf16 GEMMs are oneDNN calls; the Numba
  kernels gain nothing there for a general linear (lm_head is 2 bytes/weight and torch
  streams it at ~60-70 % of DRAM bandwidth).
"""

from __future__ import annotations

import torch

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.linear import linear as _ref_linear
from ...numerics.quant import QuantWeight
from .bf16 import round_f32
from .gemm import pack_w8a8, w8a8_linear
from .gemm_group import group_gemm_linear
from .jit import njit_kernel
from .prepared import PackedGroupLinear, PackedLinear

__all__ = ["linear", "prepare_linear"]


def prepare_linear(w: QuantWeight | GroupQuantWeight) -> PackedLinear | PackedGroupLinear:
    """Load-time form of an INT8 ``linear`` weight (per-row or group-scaled): packed for the
    active kernel family."""
    if isinstance(w, GroupQuantWeight):
        return PackedGroupLinear.of(w)
    if isinstance(w, PackedLinear):
        return w
    return PackedLinear(pack_w8a8(w.qweight, w.scale.float()), w.scale)


@njit_kernel
def _round_bf16_inplace(a):
    """``a`` (1-D float32) rounded to bf16 values in place (RNE: torch's ``.to(bfloat16)``)."""
    for i in range(a.size):
        a[i] = round_f32(a[i], True)


def _round(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (a float32 tensor this module just made and owns) holding ``dtype`` values."""
    if dtype == torch.float32:
        return y
    if y.is_contiguous():
        _round_bf16_inplace(y.numpy().reshape(-1))  # no torch conversion pair per call
        return y
    return y.to(dtype).float()


def linear(x: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """``y = x @ wᵀ``: x [..., in], w [out, in] or a QuantWeight -> [..., out] float32 holding
    ``dtype``-rounded values. Same signature and semantics as the reference ``linear``."""
    if isinstance(w, QuantWeight):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} input features, weight has {w.shape[1]}")
        y = w8a8_linear(x, prepare_linear(w).packed)  # (detached by its input normalisation)
        return _round(y, dtype)
    if isinstance(w, GroupQuantWeight):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} input features, weight has {w.shape[1]}")
        return _round(group_gemm_linear(x.detach(), PackedGroupLinear.of(w).packed), dtype)
    return _ref_linear(x, w, dtype)
