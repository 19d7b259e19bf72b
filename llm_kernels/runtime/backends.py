"""Stage-implementation namespaces ("backends") the engines compose, per model.

* ``reference``: the torch reference (:mod:`llm_kernels.reference.deepseek_v4`, or
  :mod:`llm_kernels.reference.qwen3` for ``model="qwen3"``).
* ``fused``: the Numba kernels of :mod:`llm_kernels.kernels.deepseek_v4` (``.qwen3``) for
  every stage that has one; the other stages use the reference. :func:`backend_stages`
  says which.

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
_FUSED_MODULES_QWEN3 = {
    "input_norm_qkv": "qkv_proj", "qk_norm_rope_cache": "qk_norm_rope", "paged_attention": "attention",
    "o_proj_residual_norm": "o_proj", "gate_up_swiglu": "mlp", "down_residual": "mlp",
}
MODELS = ("deepseek_v4", "qwen3")
_cache: dict[str, SimpleNamespace] = {}


def _reference(model: str) -> SimpleNamespace:
    if model == "qwen3":
        from .qwen3_engine import REFERENCE_OPS as q3

        return q3
    return REFERENCE_OPS


def _fused(model: str = "deepseek_v4") -> tuple[SimpleNamespace, dict[str, str]]:
    ops = dict(vars(_reference(model)))
    where = {k: "reference" for k in ops}
    modules = _FUSED_MODULES_QWEN3 if model == "qwen3" else _FUSED_MODULES
    for stage, mod in modules.items():
        try:
            m = importlib.import_module(f"llm_kernels.kernels.{model}.{mod}")
        except ModuleNotFoundError as e:
            if e.name not in (f"llm_kernels.kernels.{model}.{mod}", f"llm_kernels.kernels.{model}"):
                raise
            continue
        fn = getattr(m, stage, None)
        if fn is not None:
            ops[stage] = fn
            where[stage] = "fused"
    return SimpleNamespace(**ops), where


def get_ops(backend: str, model: str = "deepseek_v4") -> SimpleNamespace:
    """The ops namespace of ``backend`` ("reference" or "fused") for ``model``
    ("deepseek_v4" or "qwen3"). Raises ValueError otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if backend == "reference":
        return _reference(model)
    key = f"fused:{model}"
    if key not in _cache:
        _cache[key], _cache[key + ":where"] = _fused(model)
    return _cache[key]


def backend_stages(backend: str, model: str = "deepseek_v4") -> dict[str, str]:
    """{stage: "fused" | "reference"}: which implementation each stage of ``backend`` uses."""
    if backend == "reference":
        return {k: "reference" for k in vars(_reference(model))}
    get_ops("fused", model)
    return dict(_cache[f"fused:{model}:where"])
