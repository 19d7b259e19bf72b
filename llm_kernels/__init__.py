"""llm_kernels: fused, golden-validated CPU inference kernels for DeepSeek-V4 and Qwen3.

Importing the package registers the built-in models (:mod:`llm_kernels.models`)."""

from .models import deepseek_v4, qwen3  # noqa: F401  (each registers its ModelSpec)
