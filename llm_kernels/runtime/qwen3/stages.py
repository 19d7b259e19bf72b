"""Qwen3 stage tables: the ops namespaces the engine composes.

* :data:`REFERENCE_OPS`: the torch reference (:mod:`llm_kernels.reference.qwen3`).
* :data:`FUSED_OPS`: the Numba kernels (:mod:`llm_kernels.kernels.qwen3`) for the six
  layer stages, ``logits_head`` (final norm + head: the fused W8A8 GEMM for an INT8 head)
  and ``prepare_weights`` (:data:`FUSED_STAGES`); embed and RoPE table stay torch.

``prepare_weights(weights, cfg)`` runs once in the engine constructor: the kernels'
load-time weight packing (:mod:`llm_kernels.kernels.qwen3.prepare`) or, for the reference,
the identity (:func:`reference_weights`).

Kernels are imported by name: a missing stage is an ImportError, never a silent fallback.
"""

from __future__ import annotations

from ...kernels.qwen3 import attention as k_attn
from ...kernels.qwen3 import head as k_head
from ...kernels.qwen3 import mlp as k_mlp
from ...kernels.qwen3 import o_proj as k_o
from ...kernels.qwen3 import prepare as k_prep
from ...kernels.qwen3 import qk_norm_rope as k_qk
from ...kernels.qwen3 import qkv_proj as k_qkv
from ...reference.qwen3 import model as _model
from ...reference.qwen3 import paged as _paged
from ...reference.qwen3.common import rope_cos_sin
from ...reference.qwen3.mlp import down_residual, gate_up_swiglu
from ...reference.qwen3.o_proj import o_proj_residual_norm
from ...reference.qwen3.qkv_proj import input_norm_qkv
from ..stage_table import BACKENDS, StageTable

__all__ = ["REFERENCE_OPS", "FUSED_OPS", "FUSED_STAGES", "STAGES", "BACKENDS", "stages", "backend_stages",
           "reference_weights"]

# timed stage names of one layer, in order (the benchmark's rows)
STAGES = ("input_norm_qkv", "qk_norm_rope", "attention", "o_proj_residual_norm", "gate_up_swiglu",
          "down_residual")


def reference_weights(weights: dict, cfg, consume: bool = False) -> dict:
    """``prepare_weights`` of the reference backend: the weights as loaded (the identity)."""
    return weights


_REFERENCE = dict(
    embed=_model.embed, rope_cos_sin=rope_cos_sin, input_norm_qkv=input_norm_qkv,
    qk_norm_rope_cache=_paged.qk_norm_rope_cache, paged_attention=_paged.paged_attention,
    o_proj_residual_norm=o_proj_residual_norm, gate_up_swiglu=gate_up_swiglu,
    down_residual=down_residual, logits_head=_model.logits_head, prepare_weights=reference_weights,
)

_FUSED = dict(
    input_norm_qkv=k_qkv.input_norm_qkv, qk_norm_rope_cache=k_qk.qk_norm_rope_cache,
    paged_attention=k_attn.paged_attention, o_proj_residual_norm=k_o.o_proj_residual_norm,
    gate_up_swiglu=k_mlp.gate_up_swiglu, down_residual=k_mlp.down_residual,
    logits_head=k_head.logits_head, prepare_weights=k_prep.prepare_weights,
)
TABLE = StageTable(_REFERENCE, _FUSED)
REFERENCE_OPS, FUSED_OPS, FUSED_STAGES = TABLE.reference, TABLE.fused, TABLE.fused_stages
stages, backend_stages = TABLE.stages, TABLE.backend_stages
