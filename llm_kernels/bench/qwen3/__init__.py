"""Qwen3 adapter of the layer benchmark (listed in :mod:`llm_kernels.bench.adapters`): ``adapter.py`` (flags,
measurements, tables, plot), ``layer.py`` (weights, transformers layer, paged + dense KV state)."""

from .adapter import ADAPTER, Qwen3Bench

__all__ = ["ADAPTER", "Qwen3Bench"]
