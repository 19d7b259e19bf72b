"""Q / KV projection with norms and interleaved RoPE (``qkv_proj_rope``).

Spec: ``shared/design/deepseek_v4_architecture.md`` §6 (float path: the q low-rank
residual feeds ``wq_b`` unquantised, as in transformers and [OFF]).
"""

from __future__ import annotations

import torch

from ...numerics.linear import linear
from .common import apply_rope, rms_norm

__all__ = ["qkv_proj_rope"]


def qkv_proj_rope(x: torch.Tensor, wq_a: torch.Tensor, q_norm_w: torch.Tensor, wq_b: torch.Tensor,
                  wkv: torch.Tensor, kv_norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  *, num_heads: int, head_dim: int, eps: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project the attn-normed input to per-head queries and the single shared KV row.

    Args:
        x: [T, D] attn-normed hidden state.
        wq_a: [QL, D]; q_norm_w: [QL]; wq_b: [H·HD, QL]; wkv: [HD, D]; kv_norm_w: [HD].
        cos, sin: [T, RD/2] at each token's position, from the layer's RoPE profile.
    Returns:
        q [T, H, HD] (per-head unweighted RMSNorm, RoPE on the last RD lanes),
        kv [T, HD] (RMSNorm with kv_norm_w, RoPE on the last RD lanes),
        q_residual [T, QL] (normed q low-rank latent, reused by the indexer, §8).
    All float32 holding ``dtype``-rounded values.
    """
    T = x.shape[0]
    q_residual = rms_norm(linear(x, wq_a, dtype), q_norm_w, eps, dtype)
    q = linear(q_residual, wq_b, dtype).view(T, num_heads, head_dim)
    q = rms_norm(q, None, eps, dtype)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :], dtype)
    kv = rms_norm(linear(x, wkv, dtype), kv_norm_w, eps, dtype)
    kv = apply_rope(kv, cos, sin, dtype)
    return q, kv, q_residual
