"""Stage-implementation namespaces ("backends") the engine composes.

* ``reference``: the torch reference (:mod:`llm_kernels.reference.deepseek_v4`).
* ``fused``: the Numba kernels of :mod:`llm_kernels.kernels.deepseek_v4` for every stage
  that has one; the other stages use the reference. :func:`backend_stages` says which.

Both share the engine, its cache layout and its stage signatures.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from .engine import REFERENCE_OPS

__all__ = ["get_ops", "backend_stages", "BACKENDS"]

BACKENDS = ("reference", "fused")

# stage name in the ops namespace -> kernel module (under llm_kernels.kernels.deepseek_v4)
_FUSED_MODULES = {
    "hc_pre": "hc", "hc_post": "hc", "hc_head": "hc",
    "qkv_proj_rope": "qkv_proj_rope",
    "compressor_project": "compressor", "compress_windows": "compressor",
    "indexer_query": "indexer", "indexer_scores": "indexer", "indexer_topk": "indexer",
    "indexer_query_int8": "indexer", "indexer_keys_int8": "indexer", "indexer_scores_int8": "indexer",
    "sparse_attn": "sparse_attn", "sparse_attn_core": "sparse_attn", "grouped_output_proj": "sparse_attn",
    "gate": "moe", "moe": "moe",
    "rms_norm": "norm", "linear": "linear",
}
_cache: dict[str, SimpleNamespace] = {}


def _fused() -> tuple[SimpleNamespace, dict[str, str]]:
    ops = dict(vars(REFERENCE_OPS))
    where = {k: "reference" for k in ops}
    for stage, mod in _FUSED_MODULES.items():
        try:
            m = importlib.import_module(f"llm_kernels.kernels.deepseek_v4.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"llm_kernels.kernels.deepseek_v4.{mod}":
                raise
            continue
        fn = getattr(m, stage, None)
        if fn is not None:
            ops[stage] = fn
            where[stage] = "fused"
    return SimpleNamespace(**ops), where


def get_ops(backend: str) -> SimpleNamespace:
    """The ops namespace of ``backend`` ("reference" or "fused"). Raises ValueError otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return REFERENCE_OPS
    if "fused" not in _cache:
        _cache["fused"], _cache["fused_where"] = _fused()
    return _cache["fused"]


def backend_stages(backend: str) -> dict[str, str]:
    """{stage: "fused" | "reference"}: which implementation each stage of ``backend`` uses."""
    if backend == "reference":
        return {k: "reference" for k in vars(REFERENCE_OPS)}
    get_ops("fused")
    return dict(_cache["fused_where"])
