"""``linear`` and ``matmul`` in the arithmetic of a storage dtype (float32, bf16, W8A8).

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (W8A8 recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_quant import GroupQuantWeight, group_linear
from .mxfp4 import MXFP4Weight, mxfp4_linear
from .quant import QuantWeight, w8a8_linear
from .rounding import rnd

__all__ = ["linear", "matmul"]


def linear(x: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """``y = x @ wᵀ``: x [..., in], w [out, in] (``nn.Linear`` layout) -> [..., out] float32
    holding ``dtype`` values. Float32: fp32 GEMM. Bfloat16: torch's bf16 GEMM (fp32
    accumulation inside, one rounding), i.e. the operation bf16 inference runs.
    ``w`` a :class:`~.quant.QuantWeight`: W8A8 (per-row INT8 quant of x, exact INT32 GEMM,
    fp32 dequant, spec §0.3), rounded to ``dtype``; a :class:`~.group_quant.GroupQuantWeight`:
    group-scaled INT8 (:func:`~.group_quant.group_linear`), rounded to ``dtype``; an
    :class:`~.mxfp4.MXFP4Weight`: W4A8 (:func:`~.mxfp4.mxfp4_linear`), rounded to ``dtype``."""
    if isinstance(w, MXFP4Weight):
        return rnd(mxfp4_linear(x, w), dtype)
    if isinstance(w, QuantWeight):
        return rnd(w8a8_linear(x, w), dtype)
    if isinstance(w, GroupQuantWeight):
        return rnd(group_linear(x, w), dtype)
    if dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x.to(dtype), w.to(dtype)).float()


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (broadcasting ``torch.matmul``) in ``dtype`` arithmetic, returned as float32."""
    if dtype == torch.float32:
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a.to(dtype), b.to(dtype)).float()
