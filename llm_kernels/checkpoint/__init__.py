"""Checkpoint naming, validation, loading and random-checkpoint writing for DeepSeek-V4."""

from .names import FP32_TENSOR_SUFFIXES, TensorInfo, canonical_name, expected_tensors, is_ignored
from .safetensors_io import (
    DEFAULT_MAX_BYTES,
    CheckpointError,
    is_fp32_tensor,
    load_checkpoint,
)
from .writer import checkpoint_nbytes, write_random_checkpoint

__all__ = [
    "TensorInfo",
    "expected_tensors",
    "canonical_name",
    "is_ignored",
    "FP32_TENSOR_SUFFIXES",
    "CheckpointError",
    "load_checkpoint",
    "write_random_checkpoint",
    "checkpoint_nbytes",
    "is_fp32_tensor",
    "DEFAULT_MAX_BYTES",
]
