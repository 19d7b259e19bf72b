"""DeepSeek-V4 stage tables: the ops namespaces the engine composes.

* :data:`REFERENCE_OPS`: the torch reference (:mod:`llm_kernels.reference.deepseek_v4`).
* :data:`FUSED_OPS`: the Numba kernels (:mod:`llm_kernels.kernels.deepseek_v4`) for every
  stage that has one, the reference for the rest (``rope_cos_sin``).
  :data:`FUSED_STAGES` lists which; :func:`stages` / :func:`backend_stages` serve the
  model spec.

``prepare_weights(weights, cfg)`` runs once in the engine constructor: the kernels'
load-time weight packing (:mod:`llm_kernels.kernels.deepseek_v4.prepare`) or, for the
reference, the identity (:func:`reference_weights`).

The kernels are imported by name here, so a missing stage is an ImportError when this
module loads, never a silent fallback to the reference.
"""

from __future__ import annotations

from ...kernels.deepseek_v4 import compressor as k_cmp
from ...kernels.deepseek_v4 import embed as k_emb
from ...kernels.deepseek_v4 import gate as k_gate
from ...kernels.deepseek_v4 import hc as k_hc
from ...kernels.deepseek_v4 import indexer as k_idx
from ...kernels.common import linear as k_linear
from ...kernels.deepseek_v4 import moe as k_moe
from ...kernels.deepseek_v4 import norm as k_norm
from ...kernels.deepseek_v4 import output_proj as k_oproj
from ...kernels.deepseek_v4 import prepare as k_prep
from ...kernels.deepseek_v4 import qkv_proj_rope as k_qkv
from ...kernels.deepseek_v4 import sparse_attn as k_attn
from ...numerics.linear import linear
from ...reference.deepseek_v4 import compressor as _cmp
from ...reference.deepseek_v4 import hc as _hc
from ...reference.deepseek_v4 import indexer as _idx
from ...reference.deepseek_v4 import model as _model
from ...reference.deepseek_v4 import moe as _moe
from ...reference.deepseek_v4 import qkv_proj_rope as _qkv
from ...reference.deepseek_v4 import sparse_attn as _attn
from ...reference.deepseek_v4.common import rms_norm, rope_cos_sin
from ..stage_table import BACKENDS, StageTable

__all__ = ["REFERENCE_OPS", "FUSED_OPS", "FUSED_STAGES", "BACKENDS", "stages", "backend_stages", "reference_weights"]


def reference_weights(weights: dict, cfg, consume: bool = False) -> dict:
    """``prepare_weights`` of the reference backend: the weights as loaded (the identity)."""
    return weights


_REFERENCE = dict(
    embed=_model.embed, hc_pre=_hc.hc_pre, hc_pre_norm=_hc.hc_pre_norm, hc_post=_hc.hc_post,
    hc_post_pre_norm=_hc.hc_post_pre_norm, hc_head=_hc.hc_head, rms_norm=rms_norm,
    linear=linear, rope_cos_sin=rope_cos_sin, qkv_proj_rope=_qkv.qkv_proj_rope,
    compressor_project=_cmp.compressor_project, compress_windows=_cmp.compress_windows,
    indexer_query=_idx.indexer_query, indexer_scores=_idx.indexer_scores, indexer_topk=_idx.indexer_topk,
    indexer_query_int8=_idx.indexer_query_int8, indexer_keys_int8=_idx.indexer_keys_int8,
    indexer_scores_int8=_idx.indexer_scores_int8,
    sparse_attn=_attn.sparse_attn, sparse_attn_core=_attn.sparse_attn_core,
    sparse_attn_core_ragged=_attn.sparse_attn_core_ragged,
    grouped_output_proj=_attn.grouped_output_proj, gate=_moe.gate, moe=_moe.moe,
    prepare_weights=reference_weights,
)

_FUSED = dict(
    embed=k_emb.embed, hc_pre=k_hc.hc_pre, hc_pre_norm=k_hc.hc_pre_norm, hc_post=k_hc.hc_post,
    hc_post_pre_norm=k_hc.hc_post_pre_norm, hc_head=k_hc.hc_head,
    qkv_proj_rope=k_qkv.qkv_proj_rope,
    compressor_project=k_cmp.compressor_project, compress_windows=k_cmp.compress_windows,
    indexer_query=k_idx.indexer_query, indexer_scores=k_idx.indexer_scores, indexer_topk=k_idx.indexer_topk,
    indexer_query_int8=k_idx.indexer_query_int8, indexer_keys_int8=k_idx.indexer_keys_int8,
    indexer_scores_int8=k_idx.indexer_scores_int8,
    sparse_attn=k_attn.sparse_attn, sparse_attn_core=k_attn.sparse_attn_core,
    sparse_attn_core_ragged=k_attn.sparse_attn_core_ragged,
    grouped_output_proj=k_oproj.grouped_output_proj,
    gate=k_gate.gate, moe=k_moe.moe, rms_norm=k_norm.rms_norm, linear=k_linear.linear,
    prepare_weights=k_prep.prepare_weights,
)
TABLE = StageTable(_REFERENCE, _FUSED)
REFERENCE_OPS, FUSED_OPS, FUSED_STAGES = TABLE.reference, TABLE.fused, TABLE.fused_stages
stages, backend_stages = TABLE.stages, TABLE.backend_stages
