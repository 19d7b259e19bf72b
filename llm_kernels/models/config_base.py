"""Config reading shared by every model: the ``config.json`` reader and the HF rope
sub-dict parser. Model config classes live in ``models/<name>/config.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..numerics.rope import RopeParameters

__all__ = ["ConfigError", "read_config_json", "rope_from_hf"]


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



def rope_from_hf(d: dict[str, Any], default_theta: float, where: str) -> RopeParameters:
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
        return RopeParameters("default", theta)
    attention_factor = d.get("attention_factor")
    if attention_factor is None:
        # transformers' DeepseekV4Config injects 1.0 (V4 applies no YaRN mscale).
        if d.get("mscale") or d.get("mscale_all_dim"):
            raise ConfigError(f"rope_parameters[{where!r}]: mscale/mscale_all_dim are not used by "
                              "DeepSeek-V4; set attention_factor explicitly")
        attention_factor = 1.0
    return RopeParameters(
        "yarn", theta,
        factor=float(d["factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        beta_fast=float(d.get("beta_fast") or 32.0),
        beta_slow=float(d.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor),
    )
