"""Checkpoint naming, validation, loading, W8A8 conversion and random-checkpoint writing for
every registered model (the per-model tables are in ``models/<name>/weights.py``)."""

from ..errors import CheckpointError
from .names import (
    TensorInfo,
    canonical_name,
    expected_tensors,
    is_fp32_tensor,
    is_ignored,
)
from .safetensors_io import DEFAULT_MAX_BYTES, load_checkpoint
from .writer import checkpoint_nbytes, write_random_checkpoint

__all__ = [
    "TensorInfo",
    "expected_tensors",
    "canonical_name",
    "is_ignored",
    "CheckpointError",
    "load_checkpoint",
    "write_random_checkpoint",
    "checkpoint_nbytes",
    "is_fp32_tensor",
    "DEFAULT_MAX_BYTES",
]
