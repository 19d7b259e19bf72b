"""One RoPE profile (:class:`RopeParameters`) and its inverse frequencies (default or YaRN).

Spec: ``shared/design/deepseek_v4_architecture.md`` §5.2 (YaRN blending); transformers
``modeling_rope_utils._compute_yarn_parameters`` (same ramp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["RopeParameters", "rope_inv_freq"]


@dataclass(frozen=True)
class RopeParameters:
    """One RoPE profile ("main" for sliding-window layers, "compress" for CSA/HCA layers).

    ``rope_type`` is ``"default"`` (plain RoPE) or ``"yarn"``. For YaRN the inverse
    frequencies are blended between ``1/theta^(2i/d)`` and that divided by ``factor`` with
    the linear ramp of §5.2, and cos/sin are multiplied by ``attention_factor`` (1.0 in the
    V4 release: no mscale, spec §5.2; a ``config.json`` that leaves it out is read as
    transformers reads it, see ``models.config_base.rope_from_hf``).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope_type must be 'default' or 'yarn', got {self.rope_type!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_type == "yarn":
            if not self.factor >= 1.0:
                raise ConfigError(f"yarn factor must be >= 1, got {self.factor}")
            if self.original_max_position_embeddings <= 0:
                raise ConfigError("yarn needs original_max_position_embeddings > 0")

    def to_hf(self, partial_rotary_factor: float) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                             "partial_rotary_factor": partial_rotary_factor}
        if self.rope_type == "yarn":
            d.update(factor=self.factor,
                     original_max_position_embeddings=self.original_max_position_embeddings,
                     beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                     attention_factor=self.attention_factor)
        return d


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
