"""DeepSeek-V4 adapter of the layer benchmark (listed in :mod:`llm_kernels.bench.adapters`): ``adapter.py``
(flags, measurements, tables), ``layer.py`` (weights, lazily materialised experts, cache
state), ``hf.py`` (transformers' decoder layer on the same tensors)."""

from .adapter import ADAPTER, DeepSeekV4Bench

__all__ = ["ADAPTER", "DeepSeekV4Bench"]
