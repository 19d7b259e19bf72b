"""Fused ``linear`` stage: ``y = x @ wᵀ`` with the reference's signature and numerics.

Dispatch (same contract as :func:`llm_kernels.reference.deepseek_v4.common.linear`):

* ``w`` a :class:`~llm_kernels.reference.deepseek_v4.quant.QuantWeight`: W8A8 through
  :class:`llm_kernels.kernels.common.gemm.W8A8Linear` (per-token INT8 quantisation, exact
  INT32 VNNI GEMM, fp32 dequant ``fl(fl(acc·s_x)·s_w)`` in one Numba call), bitwise equal to
  the golden ``w8a8_linear``; the result is rounded to ``dtype``. The packed weight is
  cached per weight object (:func:`packed_linear`, keyed by ``id(w)``; the cache keeps
  the weight referenced so the id cannot be reused while the entry lives).
* float ``w``: torch, exactly as the reference does (fp32 GEMM, or torch's bf16 GEMM with
  fp32 accumulation for ``dtype=bfloat16``). torch bf16 GEMMs are oneDNN calls; the Numba
  kernels gain nothing there for a general linear (lm_head is 2 bytes/weight and torch
  streams it at ~60-70 % of DRAM bandwidth).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..common.gemm import W8A8Linear
from ...numerics.linear import linear as _ref_linear
from ...numerics.quant import QuantWeight

__all__ = ["linear", "packed_linear", "clear_cache"]

_CACHE: dict[int, tuple[Any, W8A8Linear]] = {}
_LOCK = threading.Lock()


def packed_linear(w: QuantWeight) -> W8A8Linear:
    """The cached :class:`W8A8Linear` of ``w`` (packed on first use)."""
    ent = _CACHE.get(id(w))
    if ent is not None and ent[0] is w:
        return ent[1]
    with _LOCK:
        ent = _CACHE.get(id(w))
        if ent is None or ent[0] is not w:
            ent = (w, W8A8Linear.from_quant_weight(w))
            _CACHE[id(w)] = ent
    return ent[1]


def clear_cache() -> None:
    """Drop every packed weight (and the references that keep the source weights alive)."""
    with _LOCK:
        _CACHE.clear()


def _round(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if dtype == torch.float32 else y.to(dtype).float()


def linear(x: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """``y = x @ wᵀ``: x [..., in], w [out, in] or a QuantWeight -> [..., out] float32 holding
    ``dtype``-rounded values. Same signature and semantics as the reference ``linear``."""
    if isinstance(w, QuantWeight):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} input features, weight has {w.shape[1]}")
        y = packed_linear(w)(x.detach())
        return _round(y, dtype)
    return _ref_linear(x, w, dtype)
