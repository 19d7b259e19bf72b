"""DeepSeek-V4 (Flash, Pro) behind the model registry.

``config.py`` (HF ``config.json`` parsing, presets ``mini``/``flash``/``pro``),
``weights.py`` (release tensor names and shapes, W8A8 set, random init, ``tid2eid`` check),
``golden.py`` (harness cases). The references are in ``reference/deepseek_v4/``, the
kernels in ``kernels/deepseek_v4/``, the engine and stage tables in ``runtime/deepseek_v4/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import ModelSpec, register
from . import weights
from .config import PRESETS, DeepSeekV4Config, preset

__all__ = ["SPEC"]


def _preset(name: str):
    def make(num_hidden_layers=None, n_routed_experts=None):
        return preset(name, num_hidden_layers=num_hidden_layers, n_routed_experts=n_routed_experts)
    return make


def _stages(backend: str):
    from ...runtime.deepseek_v4.stages import stages

    return stages(backend)


def _backend_stages(backend: str) -> dict:
    from ...runtime.deepseek_v4.stages import backend_stages

    return backend_stages(backend)


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1):
    from ...runtime.deepseek_v4.engine import DeepSeekV4Engine

    return DeepSeekV4Engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len, ops=_stages(backend),
                            timer=timer)


def _golden_cases(checkpoint: Path | None):
    from .golden import build_cases

    env = os.environ.get("LLM_KERNELS_GOLDEN_CHECKPOINT")
    return build_cases(checkpoint or (Path(env) if env else None))


def _trace_roofline(cfg, stage: str, layer_type: str | None, T: int, L: int, quant: str,
                    **kw) -> int | None:
    """Bytes one traced stage slice reads (roofline byte model), None for a stage the model
    does not count (embed, kv_cache, ...)."""
    from .config import SLIDING
    from .roofline import STAGES, stage_bytes

    if stage not in STAGES:
        return None
    try:
        return stage_bytes(cfg, stage, layer_type or SLIDING, T, L, quant, **kw)
    except ValueError:
        return None


def _bench_adapter():
    """The layer-benchmark adapter (``python -m llm_kernels bench --preset flash``)."""
    from ...bench.deepseek_v4 import ADAPTER

    return ADAPTER


SPEC = ModelSpec(
    model_type="deepseek_v4",
    config_class=DeepSeekV4Config,
    presets={name: _preset(name) for name in PRESETS},
    default_preset="mini",
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
    extras={"trace_roofline": _trace_roofline, "bench": _bench_adapter},
)
register(SPEC)
