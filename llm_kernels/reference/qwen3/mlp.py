"""Stages ``gate_up_swiglu`` and ``down_residual``: the SwiGLU MLP and its residual.

``down(silu(gate(x)) · up(x))``. Source: transformers ``Qwen3MLP.forward`` (``act_fn`` =
SiLU) and ``Qwen3DecoderLayer.forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...numerics.linear import linear
from ...numerics.rounding import rnd

__all__ = ["gate_up_swiglu", "down_residual", "mlp"]


def gate_up_swiglu(x: torch.Tensor, w_gate, w_up, dtype: torch.dtype) -> torch.Tensor:
    """x [T, hidden] -> ``silu(x @ w_gateᵀ) · (x @ w_upᵀ)`` [T, intermediate]; the gate and
    up outputs, the SiLU and the product are each rounded to ``dtype``."""
    g = linear(x, w_gate, dtype)
    u = linear(x, w_up, dtype)
    return rnd(rnd(F.silu(g), dtype) * u, dtype)


def down_residual(act: torch.Tensor, w_down, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """act [T, intermediate], residual [T, hidden] -> ``residual + act @ w_downᵀ``."""
    return rnd(residual + linear(act, w_down, dtype), dtype)


def mlp(x: torch.Tensor, w_gate, w_up, w_down, dtype: torch.dtype) -> torch.Tensor:
    """The MLP without residual: ``down(silu(gate(x)) · up(x))`` [T, hidden]."""
    return linear(gate_up_swiglu(x, w_gate, w_up, dtype), w_down, dtype)
