"""DeepSeek-V4 reference math shared by its stages: RMSNorm (weighted and unweighted),
interleaved RoPE tables and rotation.

Precision policy (all stages): math in float32, rounded to the storage ``dtype`` with
:func:`llm_kernels.numerics.rounding.rnd` where bf16 inference stores a tensor
(transformers' eager DeepseekV4 and DeepSeek's [OFF] reference keep activations in the
model dtype).

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (RMSNorm), §5 (RoPE).
"""

from __future__ import annotations

import torch

from ...numerics.rope import RopeParameters, rope_inv_freq
from ...numerics.rounding import rnd

__all__ = ["rms_norm", "rope_cos_sin", "apply_rope"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x²) + eps) * γ`` in float32 (spec §0.3).
    ``weight=None`` is the unweighted form (per-head q norm, HC input norm)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:  # unweighted: the scale factor is stored in the model dtype too
        return rnd(xf * rnd(r, dtype), dtype)
    return rnd(weight.float() * (xf * r), dtype)


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
