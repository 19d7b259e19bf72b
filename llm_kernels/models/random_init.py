"""Helpers for the models' random-checkpoint init rules (``weights.init_tensor``)."""

from __future__ import annotations

import torch

__all__ = ["normal"]


def normal(shape: tuple[int, ...], g: torch.Generator, std: float, mean: float = 0.0) -> torch.Tensor:
    """float32 ``mean + std * N(0, 1)`` of ``shape`` drawn from generator ``g``."""
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    t.mul_(std)
    if mean:
        t.add_(mean)
    return t
