"""Stage ``qk_norm_rope``: per-head RMSNorm of q and k (``q_norm``/``k_norm``, weights of
size head_dim), then rotate-half RoPE on both.

Source: transformers ``Qwen3Attention.forward`` (``self.q_norm(q.view(..., D))``) and
``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch

from .common import apply_rope, rms_norm

__all__ = ["qk_norm_rope"]


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm_w: torch.Tensor, k_norm_w: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, nq·D], k [T, nkv·D]; q_norm_w, k_norm_w [D]; cos/sin [T, D] (rope_cos_sin).
    Returns (q [T, nq, D], k [T, nkv, D]) float32 holding ``dtype`` values."""
    D = q_norm_w.shape[0]
    T = q.shape[0]
    qh = rms_norm(q.reshape(T, -1, D), q_norm_w, eps, dtype)
    kh = rms_norm(k.reshape(T, -1, D), k_norm_w, eps, dtype)
    return apply_rope(qh, cos, sin, dtype), apply_rope(kh, cos, sin, dtype)
