"""Per-stage wall-time accounting for the step drivers, with an optional trace recorder.

``with timer("sparse_attn"): ...`` accumulates seconds and calls per stage. A timer built
with ``trace=True`` also records one :class:`TraceEvent` per stage call and per scope
(``timer.scope("decode 0", T=1, L=8)``, ``timer.layer(3, "compressed_sparse_attention")``),
with start/end in ``time.perf_counter_ns`` and the nesting depth; ``llm_kernels.bench.trace``
turns them into a Chrome / Perfetto trace. Scopes never enter :attr:`StageTimer.seconds`.

Disabled paths cost one attribute check and return a shared no-op context manager.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, ContextManager, NamedTuple

__all__ = ["StageTimer", "TraceEvent", "LAYER_TYPE_SHORT"]

_NULL = nullcontext()
LAYER_TYPE_SHORT = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
                    "heavily_compressed_attention": "hca"}


class TraceEvent(NamedTuple):
    """One recorded interval: ``kind`` is ``"stage"`` (a timed stage: a leaf) or the kind of
    a scope (``"step"``, ``"layer"``, ...); ``depth`` counts the enclosing open intervals;
    ``args`` are the scope's own args, or for a stage the merged args of its enclosing scopes."""
    name: str
    t0_ns: int
    t1_ns: int
    depth: int
    kind: str
    args: dict


class StageTimer:
    """Accumulates seconds and call counts per stage name. ``with timer("sparse_attn"): ...``.
    Disabled timers cost one attribute check. ``trace=True`` (implies enabled) also records
    :attr:`events`."""

    def __init__(self, enabled: bool = True, trace: bool = False):
        self.enabled = enabled or trace
        self.tracing = trace
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[TraceEvent] = []
        self._scopes: list[dict] = []  # merged args of the open scopes (tracing only)

    def __call__(self, stage: str) -> ContextManager[None]:
        if not self.enabled:
            return _NULL
        return _Stage(self, stage)

    def _record(self, stage: str, t0: int, t1: int) -> None:
        self.seconds[stage] += (t1 - t0) * 1e-9
        self.calls[stage] += 1
        if self.tracing:  # args: the merged args of the open scopes (shared, not copied)
            sc = self._scopes
            self.events.append(TraceEvent(stage, t0, t1, len(sc), "stage", sc[-1] if sc else {}))

    def scope(self, name: str, kind: str = "scope", **args: Any) -> ContextManager[None]:
        """A named trace interval enclosing stages (a step, a layer); no-op unless tracing."""
        if not self.tracing:
            return _NULL
        return self._scope(name, kind, args)

    def layer(self, layer: int, layer_type: str) -> ContextManager[None]:
        """Scope ``"layer {i} {swa|csa|hca}"`` around one decoder layer; no-op unless tracing."""
        if not self.tracing:
            return _NULL
        return self._scope(f"layer {layer} {LAYER_TYPE_SHORT.get(layer_type, layer_type)}", "layer",
                           {"layer": layer, "layer_type": layer_type})

    def _scope(self, name: str, kind: str, args: dict) -> ContextManager[None]:
        return _Scope(self, name, kind, args)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.events.clear()

    def table(self) -> list[tuple[str, float, int, float]]:
        """Rows (stage, seconds, calls, share of total), slowest first."""
        total = sum(self.seconds.values()) or 1.0
        return sorted(((k, v, self.calls[k], v / total) for k, v in self.seconds.items()),
                      key=lambda r: -r[1])


class _Stage:
    """The context manager of one timed stage call: a plain class, not a generator-based
    ``@contextmanager``, so that the Python time spent entering and leaving it (outside
    the recorded interval, seen as driver overhead in a trace) stays a few attribute
    accesses."""

    __slots__ = ("timer", "stage", "t0")

    def __init__(self, timer: StageTimer, stage: str):
        self.timer = timer
        self.stage = stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter_ns()

    def __exit__(self, *exc: Any) -> None:
        self.timer._record(self.stage, self.t0, time.perf_counter_ns())


class _Scope:
    """The context manager of one trace scope (a step, a layer): pushes the merged args of
    the open scopes on enter, records a :class:`TraceEvent` of ``kind`` on exit."""

    __slots__ = ("timer", "name", "kind", "args", "depth", "t0")

    def __init__(self, timer: StageTimer, name: str, kind: str, args: dict):
        self.timer, self.name, self.kind, self.args = timer, name, kind, args

    def __enter__(self) -> None:
        sc = self.timer._scopes
        self.depth = len(sc)
        sc.append({**sc[-1], **self.args} if sc else dict(self.args))
        self.t0 = time.perf_counter_ns()

    def __exit__(self, *exc: Any) -> None:
        t1 = time.perf_counter_ns()
        self.timer._scopes.pop()
        self.timer.events.append(TraceEvent(self.name, self.t0, t1, self.depth, self.kind, dict(self.args)))
