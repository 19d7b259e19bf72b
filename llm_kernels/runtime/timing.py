"""Per-stage wall-time accounting for the step drivers."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

__all__ = ["StageTimer"]


class StageTimer:
    """Accumulates seconds and call counts per stage name. ``with timer("sparse_attn"): ...``.
    Disabled timers cost one attribute check."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0
            self.calls[stage] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def table(self) -> list[tuple[str, float, int, float]]:
        """Rows (stage, seconds, calls, share of total), slowest first."""
        total = sum(self.seconds.values()) or 1.0
        return sorted(((k, v, self.calls[k], v / total) for k, v in self.seconds.items()),
                      key=lambda r: -r[1])
