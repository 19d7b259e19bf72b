"""Tests of llm_kernels.models.deepseek_v4."""
