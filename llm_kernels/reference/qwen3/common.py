"""Qwen3 reference math shared by its stages: RMSNorm, rotate-half RoPE.

Source: transformers ``Qwen3RMSNorm``, ``Qwen3RotaryEmbedding``, ``rotate_half`` /
``apply_rotary_pos_emb`` (``models/qwen3/modeling_qwen3.py``); YaRN inverse frequencies
from ``modeling_rope_utils._compute_yarn_parameters`` (shared with DeepSeek-V4's profile).
"""

from __future__ import annotations

import torch

from ...numerics.rope import RopeParameters, rope_inv_freq
from ...numerics.rounding import rnd

__all__ = ["rms_norm", "rope_cos_sin", "apply_rope", "rotate_half"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim: ``γ · (x · rsqrt(mean(x²) + eps))``.

    x [..., n] float32 holding ``dtype`` values; weight [n]. The statistic and the scaled
    row are computed in float32; the row is rounded to ``dtype`` *before* the multiply by
    γ, and the product rounded again (transformers ``Qwen3RMSNorm``:
    ``weight * hidden_states.to(input_dtype)``). Returns float32 [..., n]."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return rnd(weight.float() * rnd(xf * r, dtype), dtype)


def rope_cos_sin(rope: RopeParameters, head_dim: int, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] float32 at integer ``positions`` [...]: angle_i =
    pos · inv_freq_i for i < head_dim/2, the table duplicated over both halves
    (``cat(freqs, freqs)``), times the YaRN ``attention_factor``, rounded to ``dtype``."""
    freqs = positions.float()[..., None] * rope_inv_freq(rope, head_dim)
    emb = torch.cat([freqs, freqs], dim=-1)
    return rnd(emb.cos() * rope.attention_factor, dtype), rnd(emb.sin() * rope.attention_factor, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (halves, not interleaved pairs)."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate-half RoPE: ``x·cos + rotate_half(x)·sin``, each product and the sum rounded
    to ``dtype`` (bf16 ops in transformers). x [T, n, D]; cos/sin [T, D] (broadcast over
    heads). Returns float32 [T, n, D]."""
    c, s = cos[:, None, :], sin[:, None, :]
    return rnd(rnd(x * c, dtype) + rnd(rotate_half(x) * s, dtype), dtype)
