"""Fused ``rms_norm`` stage (reference: ``reference.deepseek_v4.common.rms_norm``).

One Numba pass per row (:func:`llm_kernels.kernels.common.norm_rope.rms_norm`): sum of
squares in torch's CPU reduction order, ``r = 1/sqrt(mean + eps)``, ``rnd(γ·(x·r))`` (or
``rnd(x·rnd(r))`` without weight), output rounded to ``dtype``. Rows are independent
``prange`` iterations (deterministic for any thread count). Returns float32 holding
``dtype`` values, like the reference.
"""

from __future__ import annotations

import torch

from ..common.norm_rope import rms_norm as _rms_norm_kernel
from ..common.norm_rope import rms_norm_rows_f32
from .stage_shared import f32_np

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim (same signature/semantics as the reference ``rms_norm``)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    xin = x.detach()
    if (xin.dtype == torch.float32 and xin.dim() == 2 and xin.is_contiguous()
            and (weight is None or (weight.dim() == 1 and weight.dtype in (torch.float32, torch.bfloat16)))):
        # the decode path: float32 rows in, float32 rows out, no dtype conversions around the kernel
        wf = None if weight is None else f32_np(weight)
        return torch.from_numpy(rms_norm_rows_f32(xin.numpy(), wf, float(eps), dtype == torch.bfloat16))
    if xin.dtype not in (torch.float32, torch.bfloat16):
        xin = xin.float()
    w = None if weight is None else weight.detach()
    out_dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    y = _rms_norm_kernel(xin, w, float(eps), out_dtype=out_dt)
    return y.float() if y.dtype != torch.float32 else y
