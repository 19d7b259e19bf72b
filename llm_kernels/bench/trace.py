"""Chrome / Perfetto trace-event JSON from :class:`~llm_kernels.runtime.timing.StageTimer` events.

:func:`build_trace` turns recorded :class:`~llm_kernels.runtime.timing.TraceEvent` s into
``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}`` with ``"X"``
(complete) events on the step-driver track (the Python thread) and ``"M"`` metadata events
(process / thread names, thread counts). Stage slices get ``bytes``, ``GB/s`` and
``% roofline`` args from the model's ``spec.extras["trace_roofline"]`` byte model when a config and
a DRAM bandwidth are given. :func:`validate_trace` checks a trace's structure. Loads in
https://ui.perfetto.dev and chrome://tracing.

Worker threads of torch's OpenMP pool and numba's threading layer are not visible from
Python: the trace records their configured counts as metadata only.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import nullcontext
from typing import Any, Sequence

__all__ = ["TraceError", "build_trace", "validate_trace", "thread_info", "step_summaries",
           "roofline_quant", "measure_disabled_overhead"]

OPENMP_NOTE = ("OpenMP / numba worker threads are not visible from Python: only their configured "
               "counts are recorded; slices are on the Python step-driver thread")
_EPS_US = 1e-3
_NULL = nullcontext()


class TraceError(ValueError):
    """A trace-event object that does not satisfy :func:`validate_trace`."""


def roofline_quant(quant: str | None, stored: str | None = None) -> str:
    """The roofline storage mode (``"int8_g32"`` / ``"int8"`` / ``"w8a8"`` / ``"release"`` / ``"bf16"``) of a
    ``--quant`` value; ``stored``: the checkpoint's own scheme (used when ``quant`` is None)."""
    if quant in ("w8a8", "int8", "int8_g32"):
        return quant
    if quant is None and stored in ("w8a8", "int8", "int8_g32", "release"):
        return stored
    return "bf16"


def thread_info() -> dict[str, Any]:
    """Configured worker-thread counts (torch intra/inter-op, numba) and the driver thread."""
    import torch

    info: dict[str, Any] = {"torch_intra_op_threads": torch.get_num_threads(),
                            "torch_inter_op_threads": torch.get_num_interop_threads(),
                            "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:8],
                            "driver_thread": threading.current_thread().name,
                            "driver_tid": threading.get_native_id(),
                            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
                            "visible_threads_note": OPENMP_NOTE}
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
        info["numba_threading_layer"] = getattr(numba.config, "THREADING_LAYER", None)
    except Exception:  # numba missing or not initialised
        info["numba_threads"] = None
    return info


def _stage_roofline(cfg, name: str, args: dict, quant: str, bandwidth_gbs: float | None,
                    dur_s: float) -> dict[str, Any]:
    from .. import models

    if cfg is None or "T" not in args:
        return {}
    stage_bytes = models.spec_for_config(cfg).extras.get("trace_roofline")
    if stage_bytes is None:
        return {}
    T, L = int(args["T"]), int(args.get("L", 0))
    nbytes = stage_bytes(cfg, name, args.get("layer_type"), T, L, quant,
                         rows_per_seq=int(args.get("rows_per_seq", T)), hash_layer=bool(args.get("hash_layer", False)))
    if nbytes is None:
        return {}
    out: dict[str, Any] = {"bytes": nbytes}
    if dur_s > 0:
        gbs = nbytes / dur_s / 1e9
        out["GB/s"] = round(gbs, 3)
        if bandwidth_gbs:
            out["% roofline"] = round(100.0 * gbs / bandwidth_gbs, 2)
    return out


def build_trace(events: Sequence, *, cfg=None, quant: str = "bf16", bandwidth_gbs: float | None = None,
                metadata: dict | None = None, threads: dict | None = None,
                process_name: str = "llm_kernels profile") -> dict:
    """Trace-event object of ``events`` (TraceEvent s from a tracing StageTimer, any order).
    Times are µs from the first event; events are emitted sorted by (start, depth) so each
    track is non-decreasing and parents precede children."""
    pid = os.getpid()
    threads = thread_info() if threads is None else threads
    tid = int(threads.get("driver_tid", 1))
    meta_tid = tid + 1_000_000  # a separate metadata track (no real thread)
    evs = sorted(events, key=lambda e: (e.t0_ns, e.depth))
    origin = evs[0].t0_ns if evs else 0
    out: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": tid, "args": {"name": process_name}},
        {"ph": "M", "name": "process_labels", "pid": pid, "tid": tid,
         "args": {"labels": f"torch threads={threads.get('torch_intra_op_threads')}, "
                            f"numba threads={threads.get('numba_threads')}"}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
         "args": {"name": f"step driver (Python thread {threads.get('driver_thread', '?')})"}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": 0}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": meta_tid,
         "args": {"name": f"workers: torch {threads.get('torch_intra_op_threads')} / numba "
                          f"{threads.get('numba_threads')} threads (not traceable from Python)"}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": meta_tid, "args": {"sort_index": 1}},
    ]
    for e in evs:
        dur_ns = e.t1_ns - e.t0_ns
        args = dict(e.args)
        args["kind"] = e.kind
        if e.kind == "stage":
            args.update(_stage_roofline(cfg, e.name, e.args, quant, bandwidth_gbs, dur_ns * 1e-9))
        out.append({"ph": "X", "name": e.name, "cat": e.kind, "ts": (e.t0_ns - origin) / 1e3,
                    "dur": dur_ns / 1e3, "pid": pid, "tid": tid, "args": args})
    if evs:
        end = max(e.t1_ns for e in evs)
        out.append({"ph": "X", "name": "worker thread counts", "cat": "metadata", "ts": 0.0,
                    "dur": (end - origin) / 1e3, "pid": pid, "tid": meta_tid, "args": dict(threads)})
    other = {"roofline_quant": quant, "dram_bandwidth_GBps": bandwidth_gbs, "threads": threads,
             "note": OPENMP_NOTE}
    other.update(metadata or {})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": other}


def validate_trace(obj: Any) -> None:
    """Raise :class:`TraceError` unless ``obj`` is a well-formed trace-event object: a
    ``traceEvents`` list; every event with ``ph``/``name``/``pid``/``tid``; ``"X"`` events with
    numeric ``ts`` and ``dur >= 0``; ``"M"`` events with ``args``; per (pid, tid) track, ``"X"``
    ``ts`` non-decreasing in list order and every slice either inside or after the enclosing
    open slice (no partial overlap of siblings, a child within its parent)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("traceEvents"), list):
        raise TraceError("trace must be a dict with a 'traceEvents' list")
    tracks: dict[tuple, list[dict]] = {}
    for i, ev in enumerate(obj["traceEvents"]):
        if not isinstance(ev, dict):
            raise TraceError(f"event {i}: not an object")
        for f in ("ph", "name", "pid", "tid"):
            if f not in ev:
                raise TraceError(f"event {i} ({ev.get('name')!r}): missing field {f!r}")
        if ev["ph"] == "M":
            if not isinstance(ev.get("args"), dict):
                raise TraceError(f"event {i} ({ev['name']!r}): metadata event without args")
        elif ev["ph"] == "X":
            for f in ("ts", "dur"):
                if not isinstance(ev.get(f), (int, float)) or isinstance(ev.get(f), bool):
                    raise TraceError(f"event {i} ({ev['name']!r}): missing or non-numeric {f!r}")
            if ev["dur"] < 0:
                raise TraceError(f"event {i} ({ev['name']!r}): negative dur {ev['dur']}")
            if "args" in ev and not isinstance(ev["args"], dict):
                raise TraceError(f"event {i} ({ev['name']!r}): args must be an object")
            tracks.setdefault((ev["pid"], ev["tid"]), []).append(ev)
    for key, evs in tracks.items():
        stack: list[dict] = []
        last_ts = float("-inf")
        for ev in evs:
            ts, end = ev["ts"], ev["ts"] + ev["dur"]
            if ts < last_ts:
                raise TraceError(f"track {key}: ts not monotonic at {ev['name']!r} ({ts} < {last_ts})")
            last_ts = ts
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= ts + _EPS_US:
                stack.pop()
            if stack:
                par = stack[-1]
                if end > par["ts"] + par["dur"] + _EPS_US:
                    raise TraceError(f"track {key}: {ev['name']!r} [{ts}, {end}] overlaps "
                                     f"{par['name']!r} [{par['ts']}, {par['ts'] + par['dur']}] without "
                                     f"nesting inside it")
            stack.append(ev)


def _children(evs: list[dict], parent: dict) -> list[dict]:
    t0, t1 = parent["ts"], parent["ts"] + parent["dur"]
    return [e for e in evs if e is not parent and e["ts"] >= t0 - _EPS_US and e["ts"] + e["dur"] <= t1 + _EPS_US]


def step_summaries(trace: dict) -> list[dict]:
    """Per step slice (cat ``"step"``): name, ms, ms per leaf stage (cat ``"stage"``), the leaf
    sum and its share of the step (``coverage``), and ``other`` = 1 - coverage."""
    xs = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    rows = []
    for st in (e for e in xs if e.get("cat") == "step"):
        leaves = [e for e in _children(xs, st) if e.get("cat") == "stage"]
        per: dict[str, float] = {}
        for e in leaves:
            per[e["name"]] = per.get(e["name"], 0.0) + e["dur"] / 1e3
        leaf_ms = sum(per.values())
        ms = st["dur"] / 1e3
        rows.append({"name": st["name"], "ms": ms, "stages_ms": per, "leaf_ms": leaf_ms,
                     "coverage": leaf_ms / ms if ms else 0.0, "other": 1 - (leaf_ms / ms if ms else 0.0),
                     "n_layers": sum(1 for e in _children(xs, st) if e.get("cat") == "layer"),
                     "args": st.get("args", {})})
    return rows


class _NoTimer:
    """Baseline for :func:`measure_disabled_overhead`: no enabled flag, no check at all."""
    enabled = tracing = False

    def __call__(self, stage):
        return _NULL

    def scope(self, *a, **k):
        return _NULL

    def layer(self, *a, **k):
        return _NULL


def measure_disabled_overhead(engine, seq_id: int, token: int, steps: int = 200, rounds: int = 5,
                              block: int = 10) -> dict[str, float]:
    """Paired A/B of decode steps with a disabled :class:`StageTimer` (A, the engine default)
    against a no-check no-op timer (B), interleaved in blocks of ``block`` steps, ``steps``
    steps per arm and round; returns median per-step ms of each arm and the median of the
    per-round relative differences (A/B - 1), plus the micro-benchmarked cost of one disabled
    ``with tm(stage)`` in ns and the number of timer calls per step. Decodes
    ``2·steps·rounds`` tokens on ``seq_id`` (the cache must have room)."""
    import statistics

    from ..runtime.timing import StageTimer

    saved = engine.timer
    a_t, b_t = StageTimer(enabled=False), _NoTimer()
    ra, rb, rel = [], [], []
    try:
        for _ in range(rounds):
            ta = tb = 0.0
            for i in range(0, steps, block):
                n = min(block, steps - i)
                for timer, acc in ((a_t, "a"), (b_t, "b")) if i // block % 2 == 0 else ((b_t, "b"), (a_t, "a")):
                    engine.timer = timer
                    t0 = time.perf_counter()
                    for _ in range(n):
                        engine.decode([seq_id], [token])
                    dt = time.perf_counter() - t0
                    if acc == "a":
                        ta += dt
                    else:
                        tb += dt
            ra.append(ta / steps * 1e3)
            rb.append(tb / steps * 1e3)
            rel.append(ta / tb - 1)
        # calls per step: count with an enabled timer on one step
        counter = StageTimer(enabled=True)
        engine.timer = counter
        engine.decode([seq_id], [token])
        calls = sum(counter.calls.values()) + engine.cfg.num_hidden_layers  # + layer scopes
    finally:
        engine.timer = saved
    tm = StageTimer(enabled=False)
    n = 200_000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with tm("x"):
            pass
    t_dis = (time.perf_counter_ns() - t0) / n
    t0 = time.perf_counter_ns()
    for _ in range(n):
        pass
    t_loop = (time.perf_counter_ns() - t0) / n
    per_call = max(t_dis - t_loop, 0.0)
    step_ms = statistics.median(rb)
    return {"disabled_ms": statistics.median(ra), "noop_ms": step_ms,
            "ab_rel_median": statistics.median(rel), "ab_rel_min": min(rel), "ab_rel_max": max(rel),
            "per_call_ns": per_call, "calls_per_step": calls,
            "est_overhead_rel": per_call * calls / (step_ms * 1e6) if step_ms else 0.0}
