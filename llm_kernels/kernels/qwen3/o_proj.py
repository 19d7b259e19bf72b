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

from .proj_common import MODE_RES, act2d, check_dtype, clear_cache, run_stage, vec_f32, weight_kind

__all__ = ["o_proj_residual_norm", "clear_cache"]


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
    check_dtype(dtype)
    kind = weight_kind((wo,), ("wo",), None)
    N = wo.shape[0]
    xa, lead = act2d(attn, "attn", wo.shape[1])
    ra, rlead = act2d(residual, "residual", N)
    if rlead != lead:
        raise ValueError(f"residual: shape {tuple(residual.shape)} does not match attn's rows "
                         f"{lead} x hidden {N}")
    nw = vec_f32(post_norm_w, "post_norm_w", N)
    h, hn = run_stage(xa, (wo,), MODE_RES, dtype, nw=nw, eps=eps, post=True, res=ra, kind=kind)
    return torch.from_numpy(h).reshape(*lead, N), torch.from_numpy(hn).reshape(*lead, N)
