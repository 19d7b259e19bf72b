"""Config pieces shared by every model: :class:`ConfigError` and :class:`RopeParameters`.

(A module of its own so that ``config`` and ``config_qwen3`` can both import it without a
cycle; ``llm_kernels.config`` re-exports both names.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RopeParameters", "read_config_json"]


def read_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(file, parsed dict)`` of ``config.json`` at ``path`` (the file, or a directory
    holding it). Raises ConfigError when it is missing or not valid JSON."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}")
    try:
        return p, json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent. The message names the field."""


@dataclass(frozen=True)
class RopeParameters:
    """One RoPE profile ("main" for sliding-window layers, "compress" for CSA/HCA layers).

    ``rope_type`` is ``"default"`` (plain RoPE) or ``"yarn"``. For YaRN the inverse
    frequencies are blended between ``1/theta^(2i/d)`` and that divided by ``factor`` with
    the linear ramp of §5.2, and cos/sin are multiplied by ``attention_factor`` (1.0 in V4:
    no mscale, spec §5.2).
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

    @classmethod
    def from_hf(cls, d: dict[str, Any], default_theta: float, where: str) -> "RopeParameters":
        """Build from one HF rope sub-dict (keys ``rope_type``/``type``, ``rope_theta``, ...)."""
        known = {
            "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
            "beta_fast", "beta_slow", "attention_factor", "partial_rotary_factor",
            "mscale", "mscale_all_dim", "truncate",
        }
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"rope_parameters[{where!r}] has unknown keys {sorted(unknown)}")
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope_parameters[{where!r}].rope_type {rope_type!r} is not supported "
                              "(expected 'default' or 'yarn')")
        if d.get("truncate", True) is not True:
            raise ConfigError(f"rope_parameters[{where!r}].truncate=False is not supported")
        theta = float(d.get("rope_theta", default_theta))
        if rope_type == "default":
            return cls("default", theta)
        attention_factor = d.get("attention_factor")
        if attention_factor is None:
            # transformers' DeepseekV4Config injects 1.0 (V4 applies no YaRN mscale).
            if d.get("mscale") or d.get("mscale_all_dim"):
                raise ConfigError(f"rope_parameters[{where!r}]: mscale/mscale_all_dim are not used by "
                                  "DeepSeek-V4; set attention_factor explicitly")
            attention_factor = 1.0
        return cls(
            "yarn", theta,
            factor=float(d["factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            beta_fast=float(d.get("beta_fast") or 32.0),
            beta_slow=float(d.get("beta_slow") or 1.0),
            attention_factor=float(attention_factor),
        )

    def to_hf(self, partial_rotary_factor: float) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                             "partial_rotary_factor": partial_rotary_factor}
        if self.rope_type == "yarn":
            d.update(factor=self.factor,
                     original_max_position_embeddings=self.original_max_position_embeddings,
                     beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                     attention_factor=self.attention_factor)
        return d
