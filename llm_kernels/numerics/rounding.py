"""Storage-dtype rounding: the one place where float32 math meets the activation dtype.

Precision policy of every reference stage: math in float32; ``dtype`` is the *storage*
dtype of activations between operations (``torch.float32`` or ``torch.bfloat16``). Where a
real implementation stores a bf16 tensor, the reference rounds with :func:`rnd`, so a bf16
run reproduces the rounding points of bf16 inference. With ``dtype=torch.float32`` every
:func:`rnd` is the identity.
"""

from __future__ import annotations

import torch

__all__ = ["rnd", "check_dtype", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def rnd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to storage ``dtype`` and return it as float32 again."""
    if dtype == torch.float32:
        return x.float()
    return x.to(dtype).float()


def check_dtype(dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype`` is float32 or bfloat16 (the two compute modes)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
