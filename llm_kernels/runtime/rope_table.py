"""RoPE cos/sin tables built once per profile and read by position (the "rope cache" of
vLLM / llama.cpp), instead of recomputing ``cos(pos · inv_freq)`` in every layer of every
step: at DeepSeek-V4 Flash dims the recomputation (YaRN inverse frequencies included) cost
~0.2-0.3 ms per call, 4 calls per decode step.

The table holds exactly the values the wrapped ``rope_cos_sin`` gives for positions
``0 .. n-1`` (it is computed by that function), and the angle ``pos · inv_freq`` and its
cos/sin are element-wise, so a lookup is bitwise the direct call (tested). The table
grows by doubling when a position past its end is asked for. The last lookup of each table
is memoised by identity (every layer of a step passes the same positions tensor); an
in-place change of that tensor or of the returned ones (their ``_version``) voids it.
Inference tensors (``torch.inference_mode``, the benchmarks) have no change counter: for
them the memo rests on identity alone (nothing in the engines writes positions or cos/sin
in place).
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
        # the last lookup per table, by identity: every layer of a step asks with the same
        # positions tensor (held here, so its id is not reused while memoised)
        self._last: dict = {}

    def __call__(self, rope, rope_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last.get((id(rope), rope_dim))
        if last is not None and last[0] is rope and last[1] is positions and last[2] == _version(positions) \
                and last[4] == (_version(last[3][0]), _version(last[3][1])):
            return last[3]
        if positions.numel() == 0:
            return self._fn(rope, rope_dim, positions, self._dtype)
        pos = positions.detach()
        pos = (pos if pos.dtype == torch.int64 else pos.to(torch.int64)).numpy()  # numpy: fewer µs than torch ops
        one = pos.size == 1 and pos.ndim == 1
        lo, hi = (int(pos[0]), int(pos[0])) if one else (int(pos.min()), int(pos.max()))
        if lo < 0:
            raise ValueError(f"RoPE positions must be >= 0, got {lo}")
        key = (id(rope), rope_dim)  # (by identity: hashing the profile's fields costs more)
        tab = self._tables.get(key)
        if tab is None or tab[2] is not rope or hi >= tab[0].shape[0]:
            n = max(self._initial, tab[0].shape[0] if tab is not None and tab[2] is rope else 0)
            while n <= hi:
                n *= 2
            cos, sin = self._fn(rope, rope_dim, torch.arange(n), self._dtype)
            tab = self._tables[key] = (cos.contiguous().numpy(), sin.contiguous().numpy(), rope)  # holds rope: no id reuse
        if one:  # a decode step: a row slice (copied: the caller owns its tensors)
            out = torch.from_numpy(tab[0][lo:lo + 1].copy()), torch.from_numpy(tab[1][lo:lo + 1].copy())
        else:
            out = torch.from_numpy(tab[0][pos]), torch.from_numpy(tab[1][pos])
        self._last[(id(rope), rope_dim)] = (rope, positions, _version(positions), out,
                                            (_version(out[0]), _version(out[1])))
        return out


def _version(t: torch.Tensor) -> int | None:
    """The in-place change counter of ``t``; None for an inference tensor (made under
    ``torch.inference_mode``, which keeps no counter: the memo then relies on identity)."""
    return None if t.is_inference() else t._version
