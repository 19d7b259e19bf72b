"""Manifold-constrained hyper-connections (mHC): ``hc_pre``, ``hc_post``, ``hc_head``.

The residual stream is ``hc_mult`` parallel copies ``x_hc [T, HC, D]``. Each sublayer
(attention, MoE) collapses them with ``pre`` weights, and expands its output back with
``post`` weights plus a doubly-stochastic stream mix ``comb`` from Sinkhorn-Knopp.

Spec: ``shared/design/deepseek_v4_architecture.md`` §3.1-§3.3 (paper §2.2).
"""

from __future__ import annotations

import torch

from ...numerics.rounding import rnd
from .common import rms_norm

__all__ = ["sinkhorn", "hc_pre", "hc_pre_norm", "hc_post", "hc_post_pre_norm", "hc_head"]


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``logits [..., HC, HC]`` (float32) onto (approximately)
    doubly-stochastic matrices, spec §3.1: row softmax + eps, a column normalisation, then
    ``iters - 1`` rounds of (row, column) normalisation. ``C[i, j]`` is the weight from
    input stream i to output stream j; columns sum to 1 on return."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def _mix_logits(x_hc: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """``rsqrt(mean(xf²)+eps) · (xf @ fnᵀ)`` with xf = x_hc flattened to [T, HC·D] (float32)."""
    xf = x_hc.float().flatten(-2)
    return rms_norm(xf, None, rms_eps, torch.float32) @ fn.float().T


def hc_pre(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           *, hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the HC streams for one sublayer (spec §3.1).

    Args:
        x_hc: [T, HC, D] stream (float32 values, stored in ``dtype``).
        hc_fn: [(2+HC)·HC, HC·D] float32; hc_scale: [3]; hc_base: [(2+HC)·HC].
    Returns:
        x_mixed [T, D] (rounded to ``dtype``), post [T, HC] float32 in (0, 2),
        comb [T, HC, HC] float32 (Sinkhorn output, ``comb[t, i, j]`` = input i -> output j).
    """
    hc = hc_mult
    m = _mix_logits(x_hc, hc_fn, rms_eps)
    scale = hc_scale.float()
    base = hc_base.float()
    pre = torch.sigmoid(m[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb_logits = (m[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = sinkhorn(comb_logits, sinkhorn_iters, hc_eps)
    x_mixed = rnd((pre.unsqueeze(-1) * x_hc.float()).sum(dim=-2), dtype)
    return x_mixed, post, comb


def hc_pre_norm(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                norm_w: torch.Tensor, *, hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre` followed by the sublayer's input RMSNorm (``attn_norm`` / ``ffn_norm``,
    spec §3.1 then §2): returns ``rms_norm(x_mixed, norm_w)`` [T, D] (``dtype``-rounded),
    post [T, HC], comb [T, HC, HC]. Every sublayer starts so; the fused kernels run both in
    one dispatch."""
    x_mixed, post, comb = hc_pre(x_hc, hc_fn, hc_scale, hc_base, hc_mult=hc_mult, sinkhorn_iters=sinkhorn_iters,
                                 hc_eps=hc_eps, rms_eps=rms_eps, dtype=dtype)
    return rms_norm(x_mixed, norm_w, rms_eps, dtype), post, comb


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Expand a sublayer output back into HC streams (spec §3.2):
    ``y[:, j] = post[j]·x + Σ_i comb[i, j]·residual[:, i]``.

    x [T, D]; residual [T, HC, D] (the input of the matching ``hc_pre``); post [T, HC];
    comb [T, HC, HC]. Returns [T, HC, D] rounded to ``dtype`` (post/comb are rounded to
    ``dtype`` first, as a model-dtype implementation stores them)."""
    p = rnd(post, dtype)
    c = rnd(comb, dtype)
    expand = rnd(p.unsqueeze(-1) * x.float().unsqueeze(-2), dtype)
    mix = rnd(torch.matmul(c.transpose(-1, -2), residual.float()), dtype)
    return rnd(expand + mix, dtype)


def hc_post_pre_norm(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                     hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_w: torch.Tensor, *,
                     hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sublayer boundary: :func:`hc_post` of the sublayer that ends (``x``, ``residual``,
    ``post``, ``comb``) then :func:`hc_pre_norm` of the one that starts (``hc_fn``, ``hc_scale``,
    ``hc_base``, ``norm_w``): returns the new HC streams [T, HC, D] and the next sublayer's
    normed rows [T, D], post [T, HC], comb [T, HC, HC]. The fused kernels run it in one
    dispatch."""
    x_hc = hc_post(x, residual, post, comb, dtype)
    return (x_hc, *hc_pre_norm(x_hc, hc_fn, hc_scale, hc_base, norm_w, hc_mult=hc_mult,
                               sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, rms_eps=rms_eps, dtype=dtype))


def hc_head(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            *, hc_eps: float, rms_eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Final collapse of the HC streams before the output norm (spec §3.3): x_hc [T, HC, D],
    hc_fn [HC, HC·D], hc_scale [1], hc_base [HC] -> [T, D] rounded to ``dtype``. No Sinkhorn."""
    m = _mix_logits(x_hc, hc_fn, rms_eps)
    pre = torch.sigmoid(m * hc_scale.float() + hc_base.float()) + hc_eps
    return rnd((pre.unsqueeze(-1) * x_hc.float()).sum(dim=-2), dtype)
