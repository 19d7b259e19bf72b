"""Fused stage ``input_norm_qkv``: input RMSNorm + the Q, K and V projections in one pass.

Same signature, arguments and return values as
:func:`llm_kernels.reference.qwen3.qkv_proj.input_norm_qkv` (source: transformers
``Qwen3DecoderLayer.forward`` ``input_layernorm`` and ``Qwen3Attention`` ``q/k/v_proj``).

* W8A8 (all three weights ``QuantWeight``): the normalised row is computed once per token
  (reference roundings, torch-order ``Σx²``), quantised to INT8 and packed for the VNNI GEMM
  in the same Numba call; then ONE GEMM over ``[wq; wk; wv]`` (concatenated and packed once at
  load by :mod:`.prepare`) with the dequant/rounding epilogue writing q, k and v directly.
  Bitwise equal to the reference.
* float weights: bf16 mode with bf16 weights and ``T <= BF16_GEMV_MAX_T``: the same
  prologue feeding one ``vdpbf16ps`` GEMV over the three weights (<= 1 bf16 ulp from
  oneDNN, see :mod:`.proj_common`); otherwise the Numba norm (bitwise) + torch's ``F.linear``
  per weight exactly as the reference (bitwise).
* mixed W8A8/float weights: the Numba norm, then each projection on its own.

See :mod:`.proj_common` for the kernels, numerics and determinism.
"""

from __future__ import annotations

import torch

from . import proj_common as PC

__all__ = ["input_norm_qkv"]


def input_norm_qkv(x: torch.Tensor, norm_w: torch.Tensor, wq, wk, wv, eps: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``xn = rms_norm(x, norm_w)``; ``(xn @ wqᵀ, xn @ wkᵀ, xn @ wvᵀ)``.

    Args:
        x: ``[T, hidden]`` (or ``[..., hidden]``) float32 tensor holding ``dtype`` values.
        norm_w: ``[hidden]`` float tensor (input_layernorm γ).
        wq, wk, wv: ``[nq·D, hidden]``, ``[nkv·D, hidden]`` x2: float tensors or ``QuantWeight``.
        eps: RMSNorm epsilon (applied in float32). dtype: ``torch.float32``/``torch.bfloat16``.

    Returns:
        ``(q, k, v)`` float32 ``[..., nq·D]``, ``[..., nkv·D]``, ``[..., nkv·D]`` holding
        ``dtype``-rounded values (new contiguous tensors).

    Raises:
        ValueError: ``dtype`` not float32/bfloat16; a weight's in-dim or ``norm_w``'s length
        differs from x's last dim. TypeError: x not a floating CPU tensor; a weight neither
        a QuantWeight nor a 2-D float tensor.
    """
    ws = (wq, wk, wv)

    PC.check_dtype(dtype)
    kind = PC.weight_kind(ws, ("wq", "wk", "wv"), None)
    nw = PC.vec_f32(norm_w, "norm_w", wq.shape[1])
    p = PC.Plan(ws, PC.MODE_SPLIT, dtype, kind, nw, eps)
    xa, lead = PC.rows(x, "x", p.k)
    q, k, v = p(xa)
    return PC.wrap(q, lead), PC.wrap(k, lead), PC.wrap(v, lead)
