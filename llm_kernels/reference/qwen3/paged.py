"""Reference of the two cache-facing decode stages, over a paged K/V layout.

* ``qk_norm_rope_cache``: :func:`~.qk_norm_rope.qk_norm_rope`, then K (normed, roped) and
  V written to their slots.
* ``paged_attention``: for each sequence, its pages gathered into a dense K/V, then
  :func:`~.attention.attention` with causal context lengths.

Layout (``llm_kernels.runtime.paged_cache``): caches ``[num_blocks, nkv, block_size, D]``;
slot ``= block_id · block_size + row``; ``block_tables[s]`` the page ids of sequence s.
These are the goldens of ``llm_kernels.kernels.qwen3.qk_norm_rope`` / ``.attention``.
"""

from __future__ import annotations

import torch

from .attention import attention
from .qk_norm_rope import qk_norm_rope

__all__ = ["qk_norm_rope_cache", "paged_attention", "write_slots"]


def write_slots(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store rows x [T, nkv, D] at ``slot_mapping`` [T] of ``cache`` [NB, nkv, bs, D]
    (cast to the cache dtype). Raises ValueError for a slot outside the cache."""
    nb, _, bs, _ = cache.shape
    slots = slot_mapping.to(torch.int64)
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= nb * bs):
        raise ValueError(f"slot_mapping entries must be in [0, {nb * bs}), got "
                         f"[{int(slots.min())}, {int(slots.max())}]")
    cache[slots // bs, :, slots % bs, :] = x.to(cache.dtype)


def qk_norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor,
                       k_norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """q [T, nq·D], k/v [T, nkv·D] -> q [T, nq, D] (normed, roped); writes K/V rows to the
    caches at ``slot_mapping`` [T] int64."""
    qh, kh = qk_norm_rope(q, k, q_norm_w, k_norm_w, cos, sin, eps, dtype)
    write_slots(k_cache, kh, slot_mapping)
    write_slots(v_cache, v.reshape(kh.shape), slot_mapping)
    return qh


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_idx: torch.Tensor, context_lens: torch.Tensor,
                    scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q [T, nq, D]; query row t belongs to sequence ``seq_idx[t]`` (a row of
    ``block_tables`` [S, max_blocks] int32) and sees its first ``context_lens[t]`` tokens.
    Returns [T, nq·D] float32 holding ``dtype`` values (the reference attention's numerics).

    Raises ValueError when a context length is < 1 or needs more pages than the table row."""
    T = q.shape[0]
    bs = k_cache.shape[2]
    out = torch.empty(T, q.shape[1] * q.shape[2])
    seq_idx = seq_idx.to(torch.int64)
    ctx = context_lens.to(torch.int64)
    if T and int(ctx.min()) < 1:
        raise ValueError(f"context_lens must be >= 1, got {int(ctx.min())}")
    for s in torch.unique(seq_idx).tolist():
        rows = (seq_idx == s).nonzero().flatten()
        n = int(ctx[rows].max())
        nb = -(-n // bs)
        if nb > block_tables.shape[1]:
            raise ValueError(f"context length {n} needs {nb} pages but block_tables has {block_tables.shape[1]}")
        blocks = block_tables[s, :nb].to(torch.int64)

        def dense(c: torch.Tensor) -> torch.Tensor:
            return c[blocks].permute(0, 2, 1, 3).reshape(nb * bs, c.shape[1], c.shape[3])[:n].float()

        out[rows] = attention(q[rows], dense(k_cache), dense(v_cache), ctx[rows] - 1, torch.arange(n), scale, dtype)
    return out
