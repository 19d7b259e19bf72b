"""Stage ``o_proj_residual_norm``: output projection, residual add, post-attention RMSNorm.

Source: transformers ``Qwen3Attention.forward`` (``o_proj``) and ``Qwen3DecoderLayer.forward``
(``residual + hidden_states``, ``post_attention_layernorm``).
"""

from __future__ import annotations

import torch

from ...numerics.linear import linear
from ...numerics.rounding import rnd
from .common import rms_norm

__all__ = ["o_proj_residual_norm"]


def o_proj_residual_norm(attn: torch.Tensor, wo, residual: torch.Tensor, post_norm_w: torch.Tensor,
                         eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """attn [T, nq·D], residual [T, hidden] -> (h = residual + attn @ woᵀ, rms_norm(h))
    both [T, hidden] float32 holding ``dtype`` values (h is the next residual)."""
    h = rnd(residual + linear(attn, wo, dtype), dtype)
    return h, rms_norm(h, post_norm_w, eps, dtype)
