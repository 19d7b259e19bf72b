"""Stage ``attention``: causal grouped-query attention over a dense K/V.

``softmax(q·kᵀ·scale + causal mask) · v`` per query head, query head h reading K/V head
``h // num_key_value_groups``. bf16 mode follows transformers' eager path
(``eager_attention_forward``): bf16 QKᵀ matmul, times ``scale`` in bf16, softmax in
float32 rounded to bf16, bf16 PV matmul.
"""

from __future__ import annotations

import torch

from ...numerics.linear import matmul
from ...numerics.rounding import rnd

__all__ = ["attention"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
              kv_positions: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q [T, nq, D]; k, v [S, nkv, D]; q_positions [T], kv_positions [S] (int). Query t
    attends to the keys with ``kv_positions <= q_positions[t]``. Returns [T, nq·D] float32
    holding ``dtype`` values.

    Raises ValueError when nq is not a multiple of nkv, shapes disagree, or a query row
    has no visible key (it would be NaN)."""
    T, nq, D = q.shape
    S, nkv, Dk = k.shape
    if v.shape != k.shape or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must both be [S, nkv, {D}]")
    if nq % nkv:
        raise ValueError(f"query heads ({nq}) must be a multiple of kv heads ({nkv})")
    if q_positions.shape != (T,) or kv_positions.shape != (S,):
        raise ValueError(f"positions must be [T]={T} and [S]={S}, got {tuple(q_positions.shape)}, "
                         f"{tuple(kv_positions.shape)}")
    visible = kv_positions[None, :] <= q_positions[:, None]  # [T, S]
    if T and not bool(visible.any(dim=1).all()):
        raise ValueError("a query row sees no key (kv_positions all after its position)")
    g = nq // nkv
    qh = q.reshape(T, nkv, g, D).permute(1, 2, 0, 3).reshape(nkv, g * T, D)  # [nkv, g·T, D]
    kh = k.permute(1, 2, 0)  # [nkv, D, S]
    vh = v.permute(1, 0, 2)  # [nkv, S, D]
    s = rnd(matmul(qh, kh, dtype) * scale, dtype).reshape(nkv, g, T, S)
    s = s.masked_fill(~visible, float("-inf"))
    p = rnd(torch.softmax(s, dim=-1), dtype).reshape(nkv, g * T, S)
    o = matmul(p, vh, dtype).reshape(nkv, g, T, D)  # rounded to dtype by matmul
    return o.permute(2, 0, 1, 3).reshape(T, nq * D)
