"""Fused stage ``o_proj_residual_norm``: output projection, residual add and the
post-attention RMSNorm, with the residual add and the norm fused behind the GEMM.

Same signature, arguments and return values as
:func:`llm_kernels.reference.qwen3.o_proj.o_proj_residual_norm` (source: transformers
``Qwen3Attention.forward`` ``o_proj`` and ``Qwen3DecoderLayer.forward``).

* W8A8 (``wo`` a ``QuantWeight``): quantise+pack ``attn`` -> VNNI GEMM whose per-tile
  epilogue writes ``h = rnd(residual + rnd(y))``, then one ``prange`` pass over the rows of
  h for ``rms_norm(h)`` — all in one Numba call. Bitwise equal to the reference.
* float ``wo``: bf16 GEMV (bf16 mode, bf16 weight, small T; <= 1 bf16 ulp from oneDNN in y)
  or torch's ``F.linear`` (bitwise) followed by the same Numba residual + norm epilogue.
"""

from __future__ import annotations

import torch

from . import proj_common as PC

__all__ = ["o_proj_residual_norm"]


def o_proj_residual_norm(attn: torch.Tensor, wo, residual: torch.Tensor, post_norm_w: torch.Tensor,
                         eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = rnd(residual + attn @ woᵀ)``; returns ``(h, rms_norm(h, post_norm_w))``.

    Args:
        attn: ``[T, nq·D]`` (or ``[..., nq·D]``) float32 holding ``dtype`` values.
        wo: ``[hidden, nq·D]`` float tensor or ``QuantWeight``.
        residual: float32 ``[T, hidden]`` (same leading shape as ``attn``).
        post_norm_w: ``[hidden]`` float tensor. eps: RMSNorm epsilon.
        dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        ``(h, hn)`` float32 ``[..., hidden]`` holding ``dtype`` values; h is the next residual.

    Raises:
        ValueError: bad ``dtype``; attn's last dim != wo's in-dim; residual's shape !=
        ``[..., hidden]``; post_norm_w's length != hidden. TypeError: non-floating /
        non-CPU tensors; ``wo`` neither a QuantWeight nor a 2-D float tensor.
    """
    PC.check_dtype(dtype)
    kind = PC.weight_kind((wo,), ("wo",), None)
    nw = PC.vec_f32(post_norm_w, "post_norm_w", wo.shape[0])
    p = PC.Plan((wo,), PC.MODE_RES, dtype, kind, nw, eps, post=True)
    xa, lead = PC.rows(attn, "attn", p.k)
    ra, rlead = PC.rows(residual, "residual", p.n_out[0])
    if not PC.same_rows(xa, lead, ra, rlead):
        raise ValueError(f"residual: shape {tuple(residual.shape)} does not match attn's rows "
                         f"{tuple(attn.shape[:-1])} x hidden {p.n_out[0]}")
    h, hn = p(xa, ra)
    return PC.wrap(h, lead), PC.wrap(hn, lead)
