"""DeepSeek-V4 (Flash, Pro) behind the model registry.

``config.py`` (HF ``config.json`` parsing, presets ``mini``/``flash``/``pro``),
``weights.py`` (release tensor names and shapes, W8A8 set, random init, ``tid2eid`` check),
``golden.py`` (harness cases). The references are in ``reference/deepseek_v4/``, the
kernels in ``kernels/deepseek_v4/``, the engine and stage tables in ``runtime/deepseek_v4/``.
"""

from __future__ import annotations

from .. import ModelSpec, register
from ..spec import weight_fields
from . import golden, weights
from .config import PRESETS, DeepSeekV4Config, preset

__all__ = ["SPEC"]


def _preset(name: str):
    def make(num_hidden_layers=None, n_routed_experts=None):
        return preset(name, num_hidden_layers=num_hidden_layers, n_routed_experts=n_routed_experts)
    return make


def _stage_table():
    from ...runtime.deepseek_v4.stages import TABLE

    return TABLE


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1):
    from ...runtime.deepseek_v4.engine import DeepSeekV4Engine

    return DeepSeekV4Engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len, ops=_stage_table().stages(backend),
                            timer=timer)


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
    model_type="deepseek_v4", config_class=DeepSeekV4Config, presets={name: _preset(name) for name in PRESETS},
    default_preset="mini",
    **weight_fields(weights), stage_table=_stage_table, make_engine=_make_engine,
    golden_builder=golden.build_cases, golden_env="LLM_KERNELS_GOLDEN_CHECKPOINT",
    extras={"trace_roofline": _trace_roofline, "bench": _bench_adapter},
)
register(SPEC)
