"""Lightning indexer of CSA layers (float path).

Scores every visible compressed entry c for query token t as
``Σ_h w[t,h] · ReLU(q[t,h] · k[c]) · IHD^-0.5`` with ``w = (x @ weights_projᵀ) · IH^-0.5``
and keeps the top ``index_topk`` causally valid entries (``c < (pos+1) // ratio``).
The indexer keys ``k`` come from its own ratio-4 overlapping compressor
(:mod:`.compressor`, head dim IHD). The float path uses no Hadamard rotation: the
Sylvester Hadamard is orthonormal, so it leaves q·k unchanged in exact arithmetic; it
matters only for the INT8 path.

Spec: ``shared/design/deepseek_v4_architecture.md`` §8 (paper §2.3.1 eqs. 13-17).
"""

from __future__ import annotations

import torch

from ...numerics.linear import linear
from ...numerics.quant import hadamard, int8_matmul, quant_per_row
from .common import apply_rope

__all__ = ["indexer_query", "indexer_scores", "indexer_topk", "indexer_query_int8", "indexer_keys_int8",
           "indexer_scores_int8"]


def indexer_query(q_residual: torch.Tensor, x: torch.Tensor, wq_b: torch.Tensor,
                  weights_proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  n_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer queries and head weights.

    Args:
        q_residual: [T, QL] normed q latent (from ``qkv_proj_rope``); x: [T, D] attn-normed
        input; wq_b: [IH·IHD, QL]; weights_proj: [IH, D]; cos, sin: [T, RD/2] at token
        positions (compress profile).
    Returns:
        q [T, IH, IHD] (RoPE on the last RD lanes), w [T, IH] float32 (· IH^-0.5).
    """
    T = x.shape[0]
    q = linear(q_residual, wq_b, dtype).view(T, n_heads, head_dim)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :], dtype)
    w = linear(x, weights_proj, dtype) * n_heads ** -0.5
    return q, w


def indexer_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index scores [T, N] float32 for queries q [T, IH, IHD], head weights w [T, IH] and
    compressed keys [N, IHD]: ``Σ_h w[t,h] · ReLU(q[t,h]·k[c]) · IHD^-0.5``."""
    head_dim = q.shape[-1]
    s = torch.relu(torch.einsum("thd,nd->thn", q.float(), keys.float())) * head_dim ** -0.5
    return (s * w.float().unsqueeze(-1)).sum(dim=1)


def indexer_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int) -> torch.Tensor:
    """Top-k selection with causal validity.

    Args:
        scores: [T, N] float32 over compressed entries 0..N-1; positions: [T] int.
    Returns:
        [T, min(topk, N)] int64 entry indices, best first; entries that are not causally
        visible (``c >= (pos+1) // ratio``) are -1.
    """
    n = scores.shape[-1]
    k = min(topk, n)
    if k == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.int64)
    limit = (positions.long() + 1) // ratio
    future = torch.arange(n).view(1, -1) >= limit.view(-1, 1)
    idx = scores.masked_fill(future, float("-inf")).topk(k, dim=-1).indices
    return torch.where(idx >= limit.view(-1, 1), torch.full_like(idx, -1), idx)


# ---------------------------------------------------------------------- INT8 indexer (W8A8)
def indexer_query_int8(q_residual: torch.Tensor, x: torch.Tensor, wq_b, weights_proj: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, n_heads: int, head_dim: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT8 indexer queries (spec §8 steps 1-5).

    ``q = W8A8(q_residual, wq_b)`` -> RoPE on the last RD lanes -> rounded to bf16 ->
    ``@ Hadamard(IHD)`` -> per-(token, head) INT8 quant.
    Returns q_i8 [T, IH, IHD] int8, q_scale [T, IH, 1] float32, w [T, IH] float32
    (= (x @ weights_projᵀ) · IH^-0.5)."""
    T = x.shape[0]
    q = linear(q_residual, wq_b, dtype).view(T, n_heads, head_dim)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :], torch.bfloat16)
    q_i8, q_scale = quant_per_row(q @ hadamard(head_dim))
    w = linear(x, weights_proj, dtype) * n_heads ** -0.5
    return q_i8, q_scale, w


def indexer_keys_int8(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 indexer keys from compressed entries [N, IHD] (spec §7.3, inner compressor):
    ``k' = bf16(bf16(k) @ Hadamard)``, per-row INT8 quant. Returns k_i8 [N, IHD] int8 and
    k_scale [N, 1] float32."""
    kb = keys.to(torch.bfloat16).float()
    rotated = (kb @ hadamard(keys.shape[-1])).to(torch.bfloat16).float()
    return quant_per_row(rotated)


def indexer_scores_int8(q_i8: torch.Tensor, q_scale: torch.Tensor, w: torch.Tensor, k_i8: torch.Tensor,
                        k_scale: torch.Tensor) -> torch.Tensor:
    """INT8 index scores [T, N] float32 (spec §8 step 7):
    ``k_scale[c] · Σ_h w[t,h] · ReLU(q_scale[t,h] · (q_i8[t,h] · k_i8[c])) · IHD^-0.5``
    with exact INT32 dot products."""
    head_dim = q_i8.shape[-1]
    acc = int8_matmul(q_i8, k_i8).float()                       # [T, IH, N]
    s = torch.relu(q_scale * acc) * head_dim ** -0.5
    return (s * w.float().unsqueeze(-1)).sum(dim=1) * k_scale.float().view(1, -1)
