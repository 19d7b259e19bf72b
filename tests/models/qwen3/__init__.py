"""Tests of llm_kernels.models.qwen3."""
