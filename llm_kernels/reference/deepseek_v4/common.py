"""Numeric helpers shared by the DeepSeek-V4 reference stages.

Precision policy (all stages): math in float32; ``dtype`` is the *storage* dtype of
activations between operations (``torch.float32`` or ``torch.bfloat16``). Where a real
implementation would store a bf16 tensor, the reference rounds with :func:`rnd`, so a
bf16 run reproduces the rounding points of bf16 inference (transformers' eager
DeepseekV4 and DeepSeek's [OFF] reference keep activations in the model dtype). With
``dtype=torch.float32`` every :func:`rnd` is the identity.

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (RMSNorm), §5 (RoPE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import RopeParameters
from .quant import QuantWeight, w8a8_linear

__all__ = ["rnd", "linear", "matmul", "rms_norm", "rope_inv_freq", "rope_cos_sin", "apply_rope"]


def rnd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to storage ``dtype`` and return it as float32 again."""
    if dtype == torch.float32:
        return x.float()
    return x.to(dtype).float()


def linear(x: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """``y = x @ wᵀ``: x [..., in], w [out, in] (``nn.Linear`` layout) -> [..., out] float32
    holding ``dtype`` values. Float32: fp32 GEMM. Bfloat16: torch's bf16 GEMM (fp32
    accumulation inside, one rounding), i.e. the operation bf16 inference runs.
    ``w`` a :class:`~.quant.QuantWeight`: W8A8 (per-row INT8 quant of x, exact INT32 GEMM,
    fp32 dequant, spec §0.3), rounded to ``dtype``."""
    if isinstance(w, QuantWeight):
        return rnd(w8a8_linear(x, w), dtype)
    if dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x.to(dtype), w.to(dtype)).float()


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (broadcasting ``torch.matmul``) in ``dtype`` arithmetic, returned as float32."""
    if dtype == torch.float32:
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a.to(dtype), b.to(dtype)).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x²) + eps) * γ`` in float32 (spec §0.3).
    ``weight=None`` is the unweighted form (per-head q norm, HC input norm)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:  # unweighted: the scale factor is stored in the model dtype too
        return rnd(xf * rnd(r, dtype), dtype)
    return rnd(weight.float() * (xf * r), dtype)


def rope_inv_freq(rope: RopeParameters, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] float32 of one RoPE profile, with YaRN blending
    (spec §5.2): pairs with ``i <= low`` keep ``θ^(-2i/d)``, ``i >= high`` are divided by
    ``factor``, a linear ramp in between."""
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    pos_freqs = rope.rope_theta ** exponent
    if rope.rope_type == "default":
        return 1.0 / pos_freqs
    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(rope.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (
            2 * math.log(rope.rope_theta))
    low = max(math.floor(corr_dim(rope.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rope.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return (1.0 / (rope.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_cos_sin(rope: RopeParameters, rope_dim: int, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., rope_dim/2] float32 at integer ``positions`` [...] (angle =
    pos · inv_freq, times ``attention_factor``), rounded to ``dtype`` like a table stored
    in the model dtype."""
    freqs = positions.float()[..., None] * rope_inv_freq(rope, rope_dim)
    return rnd(freqs.cos() * rope.attention_factor, dtype), rnd(freqs.sin() * rope.attention_factor, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
               inverse: bool = False) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on the *trailing* ``2·cos.shape[-1]`` lanes of ``x`` (spec
    §5.3): pair i = lanes (2i, 2i+1) of the rope slice, rotated by e^{+iθ} (or e^{-iθ} when
    ``inverse``). ``x`` [..., n, d] or [..., d]; ``cos``/``sin`` broadcast against
    ``x[..., :rd/2]`` after the caller aligns leading dims. Leading "nope" lanes pass
    through; the result is rounded to ``dtype``."""
    rd = 2 * cos.shape[-1]
    xf = x.float()
    nope, rope = xf[..., :-rd], xf[..., -rd:]
    xe, xo = rope[..., 0::2], rope[..., 1::2]
    s = -sin if inverse else sin
    ye = xe * cos - xo * s
    yo = xo * cos + xe * s
    rot = torch.stack((ye, yo), dim=-1).flatten(-2)
    return rnd(torch.cat([nope, rot], dim=-1), dtype)
