"""Qwen3 (dense) behind the model registry.

``config.py`` (HF ``config.json`` parsing, presets ``qwen3-mini``/``qwen3-32b``),
``weights.py`` (transformers tensor names, W8A8 set, random init), ``golden.py`` (harness
cases). The references are in ``reference/qwen3/``, the kernels in ``kernels/qwen3/``, the
engine (paged KV cache) and stage tables in ``runtime/qwen3/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import ConfigError
from .. import ModelSpec, register
from . import weights
from .config import QWEN3_PRESETS, Qwen3Config, qwen3_preset

__all__ = ["SPEC"]


def _preset(name: str):
    def make(num_hidden_layers=None, n_routed_experts=None):
        if n_routed_experts is not None:
            raise ConfigError(f"preset {name!r} is a dense model: --experts does not apply")
        return qwen3_preset(name, num_hidden_layers)
    return make


def _stages(backend: str):
    from ...runtime.qwen3.stages import stages

    return stages(backend)


def _backend_stages(backend: str) -> dict:
    from ...runtime.qwen3.stages import backend_stages

    return backend_stages(backend)


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1):
    from ...runtime.qwen3.engine import Qwen3Engine

    if max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"{max_seq_len} tokens exceed the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return Qwen3Engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                       ops=_stages(backend), timer=timer)


def _golden_cases(checkpoint: Path | None):
    from .golden import build_cases

    env = os.environ.get("LLM_KERNELS_GOLDEN_QWEN3_CHECKPOINT")
    return build_cases(checkpoint or (Path(env) if env else None))


def _bench_adapter():
    """The layer-benchmark adapter (``python -m llm_kernels bench --preset qwen3-32b``)."""
    from ...bench.qwen3 import ADAPTER

    return ADAPTER


SPEC = ModelSpec(
    model_type="qwen3",
    config_class=Qwen3Config,
    presets={name: _preset(name) for name in QWEN3_PRESETS},
    default_preset="qwen3-mini",
    expected_float_tensors=weights.expected_float_tensors,
    canonical_name=weights.canonical_name,
    is_ignored=weights.is_ignored,
    is_fp32_tensor=weights.is_fp32_tensor,
    is_w8a8_weight=weights.is_w8a8_weight,
    w8a8_modules=tuple(weights.W8A8_MODULES),
    init_tensor=weights.init_tensor,
    check_int_tensor=weights.check_int_tensor,
    stages=_stages,
    backend_stages=_backend_stages,
    make_engine=_make_engine,
    golden_cases=_golden_cases,
    extras={"bench": _bench_adapter},
)
register(SPEC)
