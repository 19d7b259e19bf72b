"""RoPE cos/sin tables built once per profile and read by position (the "rope cache" of
vLLM / llama.cpp), instead of recomputing ``cos(pos · inv_freq)`` in every layer of every
step: at DeepSeek-V4 Flash dims the recomputation (YaRN inverse frequencies included) cost
~0.2-0.3 ms per call, 4 calls per decode step.

The table holds exactly the values the wrapped ``rope_cos_sin`` gives for positions
``0 .. n-1`` (it is computed by that function), and the angle ``pos · inv_freq`` and its
cos/sin are element-wise, so a lookup is bitwise the direct call (tested). The table
grows by doubling when a position past its end is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["RopeTables"]


class RopeTables:
    """``tables(rope, rope_dim, positions)`` -> ``(cos, sin)`` float32 ``[..., rope_dim/2]``,
    bitwise ``rope_cos_sin(rope, rope_dim, positions, dtype)``.

    Args:
        rope_cos_sin: the function to tabulate, ``(rope, rope_dim, positions, dtype)``.
        dtype: the storage dtype passed to it.
        initial: positions in a new table (it doubles on demand).

    Raises ValueError for a negative position."""

    def __init__(self, rope_cos_sin: Callable, dtype: torch.dtype, initial: int = 1024) -> None:
        self._fn, self._dtype, self._initial = rope_cos_sin, dtype, int(initial)
        self._tables: dict = {}

    def __call__(self, rope, rope_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.long()
        if pos.numel() == 0:
            return self._fn(rope, rope_dim, positions, self._dtype)
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0:
            raise ValueError(f"RoPE positions must be >= 0, got {lo}")
        key = (rope, int(rope_dim))
        tab = self._tables.get(key)
        if tab is None or hi >= tab[0].shape[0]:
            n = max(self._initial, tab[0].shape[0] if tab is not None else 0)
            while n <= hi:
                n *= 2
            cos, sin = self._fn(rope, rope_dim, torch.arange(n), self._dtype)
            tab = self._tables[key] = (cos.contiguous(), sin.contiguous())
        return tab[0][pos], tab[1][pos]
