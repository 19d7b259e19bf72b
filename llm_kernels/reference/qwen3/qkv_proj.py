"""Stage ``input_norm_qkv``: input RMSNorm, then the Q, K and V projections.

Source: transformers ``Qwen3DecoderLayer.forward`` (``input_layernorm``) and
``Qwen3Attention.forward`` (``q_proj``/``k_proj``/``v_proj``, no bias).
"""

from __future__ import annotations

import torch

from ...numerics.linear import linear
from .common import rms_norm

__all__ = ["input_norm_qkv"]


def input_norm_qkv(x: torch.Tensor, norm_w: torch.Tensor, wq, wk, wv, eps: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hidden] (float32 holding ``dtype`` values) -> (q [T, nq·D], k [T, nkv·D],
    v [T, nkv·D]) float32 holding ``dtype`` values.

    ``xn = rms_norm(x, norm_w)`` (with rsqrt: the seed review's bug was a missing rsqrt),
    then ``q = xn @ wqᵀ``, ``k = xn @ wkᵀ``, ``v = xn @ wvᵀ``. Weights are ``[out, hidden]``
    float tensors or QuantWeight (W8A8)."""
    xn = rms_norm(x, norm_w, eps, dtype)
    return linear(xn, wq, dtype), linear(xn, wk, dtype), linear(xn, wv, dtype)
