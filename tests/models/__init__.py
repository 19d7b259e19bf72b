"""Tests of llm_kernels.models (a package: the per-model folders share module basenames)."""
