"""DeepSeek-V4 (Flash, Pro) behind the model registry.

``config.py`` (HF ``config.json`` parsing, presets ``mini``/``flash``/``pro``),
``weights.py`` (release tensor names and shapes, W8A8 set, random init, ``tid2eid`` check),
``golden.py`` (harness cases). The references are in ``reference/deepseek_v4/``, the
kernels in ``kernels/deepseek_v4/``, the engine and stage tables in ``runtime/deepseek_v4/``.
"""

from __future__ import annotations

from .. import ModelSpec, register
from ..spec import weight_fields
from . import golden, roofline, weights
from .config import PRESETS, DeepSeekV4Config, preset

__all__ = ["SPEC"]


def _preset(name: str):
    def make(num_hidden_layers=None, n_routed_experts=None, mtp_layers=None):
        return preset(name, num_hidden_layers=num_hidden_layers, n_routed_experts=n_routed_experts,
                      mtp_layers=mtp_layers)
    return make


def _stage_table():
    from ...runtime.deepseek_v4.stages import TABLE

    return TABLE


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1,
                 consume_weights=False, layers=None):
    from ...runtime.deepseek_v4.engine import DeepSeekV4Engine

    return DeepSeekV4Engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len, ops=_stage_table().stages(backend),
                            timer=timer, consume_weights=consume_weights, layers=layers)


SPEC = ModelSpec(
    model_type="deepseek_v4", config_class=DeepSeekV4Config, presets={name: _preset(name) for name in PRESETS},
    default_preset="mini",
    **weight_fields(weights), stage_table=_stage_table, make_engine=_make_engine,
    golden_builder=golden.build_cases, golden_env="LLM_KERNELS_GOLDEN_CHECKPOINT",
    extras={"trace_roofline": roofline.trace_stage_bytes},
)
register(SPEC)
