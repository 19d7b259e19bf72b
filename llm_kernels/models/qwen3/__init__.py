"""Qwen3 (dense) behind the model registry.

``config.py`` (HF ``config.json`` parsing, presets ``qwen3-mini``/``qwen3-32b``),
``weights.py`` (transformers tensor names, W8A8 set, random init), ``golden.py`` (harness
cases). The references are in ``reference/qwen3/``, the kernels in ``kernels/qwen3/``, the
engine (paged KV cache) and stage tables in ``runtime/qwen3/``.
"""

from __future__ import annotations

from ...errors import ConfigError
from .. import ModelSpec, register
from ..spec import weight_fields
from . import golden, roofline, weights
from .config import QWEN3_PRESETS, Qwen3Config, qwen3_preset

__all__ = ["SPEC"]


def _preset(name: str):
    def make(num_hidden_layers=None, n_routed_experts=None, mtp_layers=None):
        if n_routed_experts is not None:
            raise ConfigError(f"preset {name!r} is a dense model: --experts does not apply")
        if mtp_layers:
            raise ConfigError(f"preset {name!r} has no multi-token-prediction block: --mtp-layers does not apply")
        return qwen3_preset(name, num_hidden_layers)
    return make


def _stage_table():
    from ...runtime.qwen3.stages import TABLE

    return TABLE


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1,
                 consume_weights=False, layers=None):
    from ...runtime.qwen3.engine import Qwen3Engine

    if max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"{max_seq_len} tokens exceed the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return Qwen3Engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                       ops=_stage_table().stages(backend), timer=timer, consume_weights=consume_weights,
                       layers=layers)


SPEC = ModelSpec(
    model_type="qwen3", config_class=Qwen3Config, presets={name: _preset(name) for name in QWEN3_PRESETS},
    default_preset="qwen3-mini",
    **weight_fields(weights), stage_table=_stage_table, make_engine=_make_engine,
    golden_builder=golden.build_cases, golden_env="LLM_KERNELS_GOLDEN_QWEN3_CHECKPOINT",
    extras={"trace_roofline": roofline.trace_stage_bytes},
)
register(SPEC)
