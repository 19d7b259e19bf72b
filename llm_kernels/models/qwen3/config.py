"""Qwen3 (dense) configuration read from a Hugging Face ``config.json``, plus presets.

Field names follow transformers' ``Qwen3Config`` (5.x). Both the modern
``rope_parameters`` dict and the older top-level ``rope_theta`` + ``rope_scaling`` are
accepted. RoPE scaling: ``default`` and ``yarn`` (Qwen3's long-context recipe; when
``attention_factor`` is absent it is ``0.1·ln(factor) + 1``, as transformers'
``_compute_yarn_parameters`` infers it). Sliding-window attention (``use_sliding_window``)
and attention biases are not part of Qwen3 releases and are refused with a
:class:`~llm_kernels.errors.ConfigError` naming the field.

Source: transformers ``models/qwen3/configuration_qwen3.py`` and ``modeling_rope_utils.py``;
the Qwen3-32B release ``config.json`` for the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...numerics.rope import RopeParameters
from ..config_base import (
    HFFields,
    config_from_json,
    rope_from_hf,
    typed_fields,
    warn_unknown_keys,
)

__all__ = ["Qwen3Config", "QWEN3_PRESETS", "qwen3_preset"]

_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "attention_dropout", "pad_token_id", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "_name_or_path", "output_attentions", "quantization_config", "layer_types",
    "max_window_layers", "sliding_window", "use_sliding_window", "rope_theta", "rope_scaling",
    "rope_parameters", "hidden_act", "attention_bias", "num_key_value_heads", "head_dim",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "auto_map",
}


def _rope_from_hf(f: HFFields, max_pos: int) -> RopeParameters:
    """RopeParameters from ``rope_parameters`` / ``rope_scaling`` + ``rope_theta``, read as
    transformers reads them: a YaRN ``attention_factor`` absent is inferred from ``factor``
    (and ``mscale``/``mscale_all_dim``), ``original_max_position_embeddings`` absent is
    ``max_position_embeddings`` (``standardize_rope_params``), ``factor`` absent is
    ``max_position_embeddings / original_max_position_embeddings``."""
    where = "rope_parameters" if f.dict("rope_parameters") is not None else "rope_scaling"
    rp = dict(f.dict("rope_parameters") or f.dict("rope_scaling") or {})
    sub = HFFields(rp, where)
    top_theta = f.float("rope_theta", 10000.0)
    theta = sub.float("rope_theta", None)
    if theta is None:
        theta = top_theta
    rp["rope_theta"] = theta
    prf = sub.float("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise ConfigError(f"{where}.partial_rotary_factor={prf} is not supported by Qwen3 (full-width RoPE)")
    rp.pop("partial_rotary_factor", None)
    rope_type = sub.str("rope_type", None) or sub.str("type", "default")
    if rope_type == "default":
        # transformers ignores them with a warning, and so do we
        warn_unknown_keys(set(rp) - {"rope_type", "type", "rope_theta"}, "rope_type 'default'", where=where)
        return RopeParameters("default", theta)
    if rope_type != "yarn":
        raise ConfigError(f"{where}.rope_type {rope_type!r} is not supported for Qwen3 "
                          "(expected 'default' or 'yarn')")
    orig = sub.int("original_max_position_embeddings", max_pos)
    if orig <= 0:
        raise ConfigError(f"{where}.original_max_position_embeddings (default: max_position_embeddings) "
                          f"must be > 0, got {orig}")
    rp["original_max_position_embeddings"] = orig
    if sub.float("factor", None) is None:
        rp["factor"] = max_pos / float(orig)
    return rope_from_hf(rp, theta, where, max_position_embeddings=max_pos)


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 dense decoder configuration (HF field names).

    GQA: ``num_attention_heads`` query heads share ``num_key_value_heads`` K/V heads
    (``num_key_value_groups`` = ratio). ``head_dim`` is independent of
    ``hidden_size / num_attention_heads`` (Qwen3-32B: 5120 hidden, 64 heads of 128).
    The constructor validates every field and raises :class:`ConfigError` naming it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeParameters = field(default_factory=lambda: RopeParameters("default", 1000000.0))
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    model_type = "qwen3"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (rotate-half RoPE), got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    # ------------------------------------------------------------------ derived
    @property
    def num_key_value_groups(self) -> int:
        """Query heads per K/V head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        """``head_dim ** -0.5`` (transformers ``Qwen3Attention.scaling``)."""
        return self.head_dim ** -0.5

    def replace(self, **changes: Any) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen3Config":
        """Parse an HF ``config.json`` dict of ``model_type`` ``qwen3``.

        Unknown keys are ignored with a warning (as transformers keeps them). Raises
        :class:`ConfigError` naming the field for a missing required field, a value of the
        wrong JSON type, or an unsupported feature (sliding window, attention bias,
        activation other than silu)."""
        f = HFFields(d)
        mt = f.str("model_type", "qwen3")
        if mt != "qwen3":
            raise ConfigError(f"model_type must be 'qwen3', got {mt!r}")
        fields = {fl.name for fl in dataclasses.fields(cls)}
        warn_unknown_keys(set(d) - fields - _IGNORED_KEYS, "Qwen3")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required fields {missing}")
        if f.str("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {d['hidden_act']!r}")
        if f.bool("attention_bias", False):
            raise ConfigError("attention_bias=True is not supported (Qwen3 releases have no q/k/v/o bias)")
        if f.bool("use_sliding_window", False):
            raise ConfigError("use_sliding_window=True is not supported (Qwen3 releases use full attention)")
        f.int("sliding_window", None)
        f.int("max_window_layers", None)
        f.dict("quantization_config")  # read by the checkpoint loader; must be an object
        lt = f.list("layer_types", str, "string")
        if lt is not None and any(t != "full_attention" for t in lt):
            raise ConfigError(f"layer_types must all be 'full_attention', got {sorted(set(lt))}")
        kw = typed_fields(f, cls, skip=("rope",), required=required)
        nh = kw["num_attention_heads"]
        head_dim = kw.get("head_dim")
        if head_dim is None:
            if nh <= 0:
                raise ConfigError(f"num_attention_heads must be a positive integer, got {nh}")
            head_dim = kw["hidden_size"] // nh
        kw["head_dim"] = head_dim
        kw.setdefault("num_key_value_heads", nh)
        max_pos = kw.get("max_position_embeddings", 40960)
        return cls(rope=_rope_from_hf(f, max_pos), **kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        """Read ``config.json`` (or a directory containing it); errors name the file."""
        return config_from_json(cls, path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5.x ``config.json`` dict (loadable by ``transformers.Qwen3Config``)."""
        rp: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.rope_theta}
        if self.rope.rope_type == "yarn":
            rp.update(factor=self.rope.factor,
                      original_max_position_embeddings=self.rope.original_max_position_embeddings,
                      beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow,
                      attention_factor=self.rope.attention_factor)
        out: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
            "rope_parameters": rp,
        }
        for f in dataclasses.fields(self):
            if f.name != "rope":
                out[f.name] = getattr(self, f.name)
        return out

    def summary(self) -> str:
        return (f"Qwen3 D={self.hidden_size} L={self.num_hidden_layers} H={self.num_attention_heads} "
                f"KV={self.num_key_value_heads} HD={self.head_dim} I={self.intermediate_size} "
                f"V={self.vocab_size}{' tied' if self.tie_word_embeddings else ''}")


def _qwen3_32b() -> Qwen3Config:
    """Qwen3-32B (release ``config.json``)."""
    return Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       rope=RopeParameters("default", 1000000.0), rms_norm_eps=1e-6,
                       max_position_embeddings=40960, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645)


def _qwen3_mini() -> Qwen3Config:
    """Small Qwen3 with every mechanism: GQA 4:1 (8 q heads, 2 kv heads), head_dim 64
    decoupled from hidden/heads (= 16), untied embeddings, rope_theta 1e6."""
    return Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       rope=RopeParameters("default", 1000000.0), rms_norm_eps=1e-6,
                       max_position_embeddings=4096, tie_word_embeddings=False)


QWEN3_PRESETS = {"qwen3-32b": _qwen3_32b, "qwen3-mini": _qwen3_mini}


def qwen3_preset(name: str, num_hidden_layers: int | None = None) -> Qwen3Config:
    """A Qwen3 preset (``qwen3-32b``, ``qwen3-mini``), optionally with ``num_hidden_layers``
    layers. Raises ConfigError for an unknown name or a non-positive layer count."""
    if name not in QWEN3_PRESETS:
        raise ConfigError(f"unknown Qwen3 preset {name!r}; choose from {sorted(QWEN3_PRESETS)}")
    cfg = QWEN3_PRESETS[name]()
    if num_hidden_layers is not None:
        if num_hidden_layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {num_hidden_layers}")
        cfg = cfg.replace(num_hidden_layers=num_hidden_layers)
    return cfg
