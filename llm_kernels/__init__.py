"""llm_kernels: fused, golden-validated CPU inference kernels for DeepSeek-V4 and Qwen3.

Importing the package registers the built-in models (:mod:`llm_kernels.models`). The Python
API (``LLM``, ``SamplingParams``, ``Completion``: :mod:`llm_kernels.api`) is imported on first
use, so ``import llm_kernels`` stays light."""

from .models import deepseek_v4, qwen3  # noqa: F401  (each registers its ModelSpec)

__all__ = ["LLM", "SamplingParams", "Completion"]


def __getattr__(name: str):
    """Lazy exports of the Python API (``from llm_kernels import LLM, SamplingParams``)."""
    if name in ("LLM", "Completion"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .text.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llm_kernels' has no attribute {name!r}")
