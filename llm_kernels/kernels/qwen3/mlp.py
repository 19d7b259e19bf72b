"""Fused stages ``gate_up_swiglu`` and ``down_residual`` of the Qwen3 SwiGLU MLP.

Same signatures, arguments and return values as
:func:`llm_kernels.reference.qwen3.mlp.gate_up_swiglu` / ``down_residual`` (source:
transformers ``Qwen3MLP.forward`` with ``act_fn`` = SiLU, ``Qwen3DecoderLayer.forward``).

* ``gate_up_swiglu``, W8A8: gate and up are packed once into ONE INT8 weight interleaved per
  64-row chunk (32 gate rows, then the same 32 up rows), so one pass over x and one GEMM
  produce, in every output tile, matching g and u; the tile's epilogue writes
  ``rnd(rnd(silu(rnd(g)))·rnd(u))`` (torch's ``x/(1+exp(-x))``, SLEEF ``expf``). Bitwise
  equal to the reference. Float weights: one bf16 GEMV call over both weights (item = the
  same rows of gate and up) or torch's two ``F.linear`` + the Numba SwiGLU epilogue.
* ``down_residual``: GEMM with ``rnd(residual + rnd(y))`` in the tile epilogue (W8A8
  bitwise; float weights as above).
"""

from __future__ import annotations

import torch

from . import proj_common as PC

__all__ = ["down_residual", "gate_up_swiglu"]


def gate_up_swiglu(x: torch.Tensor, w_gate, w_up, dtype: torch.dtype) -> torch.Tensor:
    """``silu(x @ w_gateᵀ) · (x @ w_upᵀ)`` with g, u, silu(g) and the product each rounded to
    ``dtype``.

    Args:
        x: ``[T, hidden]`` (or ``[..., hidden]``) float32 holding ``dtype`` values.
        w_gate, w_up: ``[intermediate, hidden]`` float tensors or both ``QuantWeight``.
        dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        float32 ``[..., intermediate]`` holding ``dtype`` values.

    Raises:
        ValueError: bad ``dtype``; x's last dim != hidden; gate/up shapes differ.
        TypeError: non-floating / non-CPU x; a weight of another type, or one QuantWeight
        and one float weight.
    """
    PC.check_dtype(dtype)
    kind = PC.weight_kind((w_gate, w_up), ("w_gate", "w_up"), None)
    if tuple(w_gate.shape) != tuple(w_up.shape):
        raise ValueError(f"w_up: shape {tuple(w_up.shape)} differs from w_gate's {tuple(w_gate.shape)}")
    if kind == "mixed":
        raise TypeError("w_gate, w_up: both must be QuantWeight or both float tensors")
    p = PC.Plan((w_gate, w_up), PC.MODE_SWIGLU, dtype, kind, None, 0.0)
    xa, lead = PC.rows(x, "x", p.k)
    return PC.wrap(p(xa)[0], lead)


def down_residual(act: torch.Tensor, w_down, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rnd(residual + act @ w_downᵀ)``.

    Args:
        act: ``[T, intermediate]`` (or ``[..., intermediate]``) float32 holding ``dtype`` values.
        w_down: ``[hidden, intermediate]`` float tensor or ``QuantWeight``.
        residual: float32 ``[T, hidden]`` (same leading shape as ``act``).
        dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        float32 ``[..., hidden]`` holding ``dtype`` values.

    Raises:
        ValueError: bad ``dtype``; act's last dim != w_down's in-dim; residual's shape !=
        ``[..., hidden]``. TypeError: non-floating / non-CPU tensors; a bad weight type.
    """
    PC.check_dtype(dtype)
    kind = PC.weight_kind((w_down,), ("w_down",), None)
    p = PC.Plan((w_down,), PC.MODE_RES, dtype, kind, None, 0.0)
    xa, lead = PC.rows(act, "act", p.k)
    ra, rlead = PC.rows(residual, "residual", p.n_out[0])
    if not PC.same_rows(xa, lead, ra, rlead):
        raise ValueError(f"residual: shape {tuple(residual.shape)} does not match act's rows "
                         f"{tuple(act.shape[:-1])} x hidden {p.n_out[0]}")
    return PC.wrap(p(xa, ra)[0], lead)
