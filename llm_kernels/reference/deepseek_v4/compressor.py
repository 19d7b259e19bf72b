"""KV compressors: ratio 4 with overlapping windows (CSA, also the indexer's inner
compressor) and ratio 128 without overlap (HCA).

Every token contributes a projected row ``kv = x @ wkvᵀ`` and a gate score
``score = x @ wgateᵀ + ape[pos mod ratio]`` (``[coff·d]``, coff = 2 with overlap). A
window of ``ratio`` tokens ending at position p (``(p+1) mod ratio == 0``) emits one
compressed entry: a per-channel softmax over the window rows of ``score`` pools ``kv``;
with overlap the pool spans the previous window's *front* halves (lanes ``[0:d]``) and the
current window's *back* halves (lanes ``[d:2d]``), 2·ratio rows in all. The pooled vector
is RMS-normed and its trailing RD lanes are rotated at the window start ``w0 = c·ratio``.

Spec: ``shared/design/deepseek_v4_architecture.md`` §7 (paper §2.3.1-§2.3.2).
"""

from __future__ import annotations

import torch

from ...numerics.linear import linear
from ...numerics.rounding import rnd
from .common import apply_rope, rms_norm

__all__ = ["compressor_project", "compress_windows"]


def compressor_project(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                       positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token compressor state rows (spec §7.2).

    Args:
        x: [T, D] attn-normed input; wkv, wgate: [coff·d, D]; ape: [ratio, coff·d] float32;
        positions: [T] int absolute positions.
    Returns:
        kv [T, coff·d] (``dtype``-rounded), score [T, coff·d] float32 (gate + ape of the
        token's slot ``pos mod ratio``).
    """
    ratio = ape.shape[0]
    kv = linear(x, wkv, dtype)
    score = linear(x, wgate, dtype) + ape.float()[positions % ratio]
    return kv, score


def compress_windows(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                     prev_score: torch.Tensor | None, norm_w: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *, overlap: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Pool N complete windows into N compressed entries (spec §7.3).

    Args:
        kv, score: [N, ratio, coff·d] state rows of windows c0 … c0+N-1.
        prev_kv, prev_score: overlap only: [N, ratio, d] front halves of the window before
            each of them (window c-1); ``None`` rows mean "no previous window" and are
            passed as kv = 0, score = -inf (softmax weight 0).
        norm_w: [d]; cos, sin: [N, RD/2] at each window start ``w0 = c·ratio``.
    Returns:
        [N, d] compressed entries, float32 holding ``dtype``-rounded values.
    """
    if overlap:
        d = kv.shape[-1] // 2
        if prev_kv is None:
            prev_kv = torch.zeros_like(kv[..., :d])
            prev_score = torch.full_like(score[..., :d], float("-inf"))
        rows_kv = torch.cat([prev_kv.float(), kv[..., d:].float()], dim=1)
        rows_score = torch.cat([prev_score.float(), score[..., d:].float()], dim=1)
    else:
        rows_kv, rows_score = kv.float(), score.float()
    weights = rnd(torch.softmax(rows_score, dim=1), dtype)
    pooled = rnd(rnd(rows_kv * weights, dtype).sum(dim=1), dtype)
    entry = rms_norm(pooled, norm_w, eps, dtype)
    return apply_rope(entry, cos, sin, dtype)
