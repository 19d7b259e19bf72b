"""Fused ``logits_head`` of Qwen3: final RMSNorm, then the LM head, with the signature and
numerics of :func:`llm_kernels.reference.qwen3.model.logits_head`.

* RMSNorm as transformers' ``Qwen3RMSNorm`` (float32 statistic, the row rounded to the
  dtype before the multiply by γ, the product rounded again): three torch ops on a
  ``[T, hidden]`` row block, the same ones the reference runs (bitwise equal).
* The head through :func:`llm_kernels.kernels.common.linear.linear`: an INT8 head (the
  ``int8`` scheme; prepared at load as a
  :class:`~llm_kernels.kernels.common.prepared.PackedLinear`) runs the fused W8A8 GEMM
  (per-token INT8 activations, exact INT32 sums, the golden's dequant order: bitwise equal
  to the reference); a float head runs torch's GEMM exactly like the reference. A tied
  head is the embedding (float).
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.linear import linear

__all__ = ["logits_head"]


def _rnd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if dtype == torch.float32 else x.to(dtype).float()


def logits_head(weights: dict[str, Any], cfg: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, hidden] float32 (``dtype`` values) -> logits [T, vocab] float32 holding ``dtype``
    values: ``linear(γ · rnd(x · rsqrt(mean(x²) + eps)), W_head)``. ``weights`` holds
    ``model.norm.weight`` and ``lm_head.weight`` (or ``model.embed_tokens.weight`` when
    ``cfg.tie_word_embeddings``). Raises ValueError when x's width is not the head's."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    xn = _rnd(weights["model.norm.weight"].float() * _rnd(xf * r, dtype), dtype)
    head = weights["model.embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
    return linear(xn, head, dtype)
