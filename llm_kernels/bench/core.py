"""Benchmark utilities: DRAM bandwidth, timing statistics, cold-weight rotation, paired
A/B comparison, result JSON with machine info, plain-text tables.

Methodology (``docs/benchmarks.md``):

* every figure is the **median** of ``repeats`` timed runs after ``warmup`` untimed ones;
  ``setup`` (state restore, …) runs before every run and is not timed;
* decode kernels are bandwidth bound, so a timed call must stream its weights from DRAM,
  not from the 32 MiB L3: either the call itself touches far more than L3 (a whole layer),
  or :class:`Rotation` cycles through copies totalling at least :data:`COLD_BYTES`
  (320 MB, >= 4x L3) — ``shared/design/cpu_kernel_lab.md`` §1-§2;
* "% of roofline" uses the DRAM read bandwidth measured by
  :func:`measure_dram_bandwidth` in the same process, right before the benchmark.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "bytes_arg", "csv", "ints", "loadavg", "L3_BYTES", "COLD_BYTES", "BenchResult", "PairedResult", "bench", "interleaved", "paired_ab",
    "measure_dram_bandwidth", "measure_int8_peak", "mem_available", "cold_copies", "Rotation", "machine_info", "write_results",
    "read_results", "format_table", "print_table", "fmt_bytes",
]

L3_BYTES = 32 * 2 ** 20
COLD_BYTES = max(320_000_000, 4 * L3_BYTES)   # total bytes a rotation must cover to stay cold


# ---------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class BenchResult:
    """Timings of one benchmarked callable, seconds. ``runs`` in execution order."""

    median_s: float
    min_s: float
    max_s: float
    runs: tuple[float, ...]

    @classmethod
    def from_runs(cls, runs: Iterable[float]) -> "BenchResult":
        r = tuple(float(x) for x in runs)
        if not r:
            raise ValueError("BenchResult needs at least one run")
        return cls(statistics.median(r), min(r), max(r), r)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median: a quick noise indicator."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "mean_s": self.mean_s, "runs": list(self.runs)}


def _check_counts(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def bench(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 2,
          setup: Callable[[], Any] | None = None,
          timer: Callable[[], float] = time.perf_counter) -> BenchResult:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones; ``setup()`` runs
    before every call (warm-up and timed) outside the timed region. Returns the median, min,
    max and all runs. Use ``repeats >= 5`` for reported numbers."""
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    runs = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = timer()
        fn()
        runs.append(timer() - t0)
    return BenchResult.from_runs(runs)


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
                setups: dict[str, Callable[[], Any]] | None = None,
                timer: Callable[[], float] = time.perf_counter) -> dict[str, BenchResult]:
    """Round-robin benchmark of several callables: each round runs every ``fns[name]`` once
    (order rotated by one per round so none always runs first), so slow machine drift hits
    all of them alike. ``setups[name]`` runs untimed before each call of ``fns[name]``."""
    _check_counts(repeats, warmup)
    if not fns:
        raise ValueError("interleaved() needs at least one callable")
    setups = setups or {}
    names = list(fns)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s = setups.get(n)
            if s is not None:
                s()
            t0 = timer()
            fns[n]()
            dt = timer() - t0
            if r >= warmup:
                runs[n].append(dt)
    return {n: BenchResult.from_runs(runs[n]) for n in names}


@dataclass(frozen=True)
class PairedResult:
    """Interleaved A/B timings. ``ratio`` = median over pairs of ``t_a / t_b``: the speed-up
    of B over A (> 1: B is faster). ``ratios`` per pair, in order."""

    a: BenchResult
    b: BenchResult
    ratio: float
    ratios: tuple[float, ...]

    @property
    def median_a_s(self) -> float:
        return self.a.median_s

    @property
    def median_b_s(self) -> float:
        return self.b.median_s

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "ratio_a_over_b": self.ratio,
                "ratios": list(self.ratios)}


def paired_ab(fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int = 5, *, warmup: int = 1,
              setup_a: Callable[[], Any] | None = None, setup_b: Callable[[], Any] | None = None,
              timer: Callable[[], float] = time.perf_counter) -> PairedResult:
    """Interleaved A/B: ``repeats`` pairs, alternating AB, BA, AB, … so drift and cache
    order cancel; the ratio is the median of the per-pair ratios ``t_a / t_b`` (robust
    against a noisy machine, unlike a ratio of two medians taken minutes apart)."""
    _check_counts(repeats, warmup)

    def one(fn, setup):
        if setup is not None:
            setup()
        t0 = timer()
        fn()
        return timer() - t0

    for _ in range(warmup):
        one(fn_a, setup_a)
        one(fn_b, setup_b)
    ta, tb = [], []
    for i in range(repeats):
        if i % 2 == 0:
            a = one(fn_a, setup_a)
            b = one(fn_b, setup_b)
        else:
            b = one(fn_b, setup_b)
            a = one(fn_a, setup_a)
        ta.append(a)
        tb.append(b)
    ratios = tuple(a / b if b > 0 else math.inf for a, b in zip(ta, tb))
    return PairedResult(BenchResult.from_runs(ta), BenchResult.from_runs(tb), statistics.median(ratios), ratios)


# ---------------------------------------------------------------------------- bandwidth
def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_int8_peak(T: int = 256, K: int = 2048, N: int = 1024, repeats: int = 7) -> float:
    """Compute peak of this process's INT8 GEMM in GOP/s (10⁹ ops/s, one MAC = 2 ops): the
    best of ``repeats`` timings of the production W8A8 linear
    (:func:`llm_kernels.kernels.common.gemm.w8a8_linear`: per-token quantisation, the
    active tier's register tiles, dequant) on ``x`` [T, K] float32 against a packed
    [N, K] weight that stays in L2 (2 MiB), after one untimed call. It is the ceiling a
    prefill made of INT8 GEMMs can approach on this CPU tier (it excludes DRAM traffic)."""
    import numpy as np

    from ..kernels.common.gemm import pack_w8a8, w8a8_linear

    g = np.random.default_rng(0)
    w = pack_w8a8(g.integers(-127, 128, (N, K), dtype=np.int8), np.full(N, 1e-3, np.float32))
    x = g.standard_normal((T, K), dtype=np.float32)
    w8a8_linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        w8a8_linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * T * K * N / best / 1e9


def measure_dram_bandwidth(nbytes: int = int(1.5 * 2 ** 30), repeats: int = 5, *,
                           threads: int | None = None) -> float:
    """DRAM read bandwidth in GB/s (10⁹ B/s): median over ``repeats`` of ``nbytes /
    t(torch.sum(a))`` for a float32 array ``a`` of ``nbytes`` bytes (filled with distinct values,
    so every page is touched and no two pages are identical, plus one untimed pass), using
    ``threads`` (default: torch's current count) threads.

    ``torch.sum`` over a large fp32 array is a pure streaming read (vectorised, one
    accumulator set per thread); on this 2-core Zen 4 box it reads 33-40 GB/s, the highest
    of the methods compared in ``cpu_kernel_lab.md`` §1 (numba int8/f32 sums 31-35 GB/s). The
    figure drifts over time on a shared VM (38-50 GB/s within one hour here), hence "measure in
    the same run".
    ``nbytes`` is reduced to a quarter of the available memory if RAM is short; it stays
    >= 64 MiB (2x L3) so the array cannot sit in cache."""
    import torch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    avail = mem_available()
    if avail is not None:
        nbytes = min(nbytes, avail // 4)
    nbytes = max(int(nbytes), 2 * L3_BYTES)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # distinct values on every page (no constant page a hypervisor could merge or compress)
        a = torch.arange(nbytes // 4, dtype=torch.float32)
        a.sum()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.sum()
            runs.append(time.perf_counter() - t0)
        del a
    finally:
        torch.set_num_threads(old)
    return (nbytes // 4 * 4) / statistics.median(runs) / 1e9


# ---------------------------------------------------------------------------- rotation
def cold_copies(bytes_per_copy: int, min_total_bytes: int = COLD_BYTES, max_copies: int | None = None) -> int:
    """Number of copies of a ``bytes_per_copy`` working set needed so that cycling through
    them touches ``>= min_total_bytes`` between two uses of the same copy (at least 1;
    capped at ``max_copies``)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be > 0, got {bytes_per_copy}")
    n = max(1, math.ceil(min_total_bytes / bytes_per_copy))
    return min(n, max_copies) if max_copies is not None else n


class Rotation:
    """Cycles through N copies of an input / weight set so each call sees data that was
    evicted from the caches since its last use::

        rot = Rotation.build(lambda i: make_weights(seed=i), bytes_per_copy=w_bytes)
        res = bench(lambda: kernel(x, *rot.next()))

    ``cold`` is False when the copies cover less than :data:`COLD_BYTES` (capped by
    ``max_copies``), i.e. the timings may include cache hits."""

    def __init__(self, copies: Sequence[Any], bytes_per_copy: int | None = None):
        if not copies:
            raise ValueError("Rotation needs at least one copy")
        self.copies = list(copies)
        self.bytes_per_copy = bytes_per_copy
        self._it = itertools.cycle(self.copies)

    @classmethod
    def build(cls, factory: Callable[[int], Any], bytes_per_copy: int, *,
              min_total_bytes: int = COLD_BYTES, max_copies: int | None = 64) -> "Rotation":
        n = cold_copies(bytes_per_copy, min_total_bytes, max_copies)
        return cls([factory(i) for i in range(n)], bytes_per_copy)

    def __len__(self) -> int:
        return len(self.copies)

    def next(self) -> Any:
        return next(self._it)

    @property
    def total_bytes(self) -> int | None:
        return None if self.bytes_per_copy is None else self.bytes_per_copy * len(self.copies)

    @property
    def cold(self) -> bool | None:
        t = self.total_bytes
        return None if t is None else t >= COLD_BYTES


# ---------------------------------------------------------------------------- results
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def _l3_bytes() -> int | None:
    p = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        s = p.read_text().strip().upper()
        mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError, IndexError):
        return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001 - not installed / no metadata
        return None


def machine_info(bandwidth_gbs: float | None = None,
                 bandwidth_method: str = "median of torch.sum over a float32 array (measure_dram_bandwidth)",
                 ) -> dict[str, Any]:
    """CPU model, cores, L3, memory, thread counts, library versions, measured DRAM
    bandwidth (if given, with how it was obtained) and the current date/time (UTC, ISO 8601)."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "l3_bytes": _l3_bytes(),
        "mem_total_bytes": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]   # > ~0.5 before a run: other work competes for the cores
    except OSError:
        pass
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if bandwidth_gbs is not None:
        info["dram_bandwidth_gbs"] = float(bandwidth_gbs)
        info["dram_bandwidth_method"] = bandwidth_method
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (BenchResult, PairedResult)):
        return x.to_dict()
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    try:  # numpy / torch scalars
        return x.item()
    except Exception:  # noqa: BLE001
        return str(x)


def write_results(path: str | os.PathLike, data: dict[str, Any], *, bandwidth_gbs: float | None = None,
                  machine: dict[str, Any] | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` (parent folders created), with a ``"machine"`` key
    (:func:`machine_info`, or ``machine`` if given) unless ``data`` already has one.
    BenchResult/PairedResult/dataclasses are converted; non-finite floats become null.
    Written to a temporary file and renamed. Returns the path."""
    out = dict(data)
    if "machine" not in out:
        out["machine"] = machine if machine is not None else machine_info(bandwidth_gbs)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(out), indent=2) + "\n")
    os.replace(tmp, p)
    return p


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- tables
def fmt_bytes(n: float | None) -> str:
    """1234567 -> '1.18 MiB' (binary units)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Sequence[Any] | dict[str, Any]], headers: Sequence[str] | None = None,
                 align: str | None = None, title: str | None = None) -> str:
    """Plain-text table with aligned columns. ``rows``: sequences, or dicts (``headers``
    default to the first dict's keys). ``align``: one char per column, ``l`` or ``r``
    (default: right for numbers, left otherwise). Floats get 3 significant-ish digits."""
    if rows and isinstance(rows[0], dict):
        headers = list(headers or rows[0].keys())
        body = [[_cell(r.get(h)) for h in headers] for r in rows]  # type: ignore[union-attr]
        raw = [[r.get(h) for h in headers] for r in rows]  # type: ignore[union-attr]
    else:
        body = [[_cell(c) for c in r] for r in rows]
        raw = [list(r) for r in rows]
    headers = list(headers or [])
    ncol = max([len(headers)] + [len(r) for r in body]) if (headers or body) else 0
    headers += [""] * (ncol - len(headers))
    body = [r + [""] * (ncol - len(r)) for r in body]
    if align is None:
        align = "".join("r" if any(isinstance(r[c], (int, float)) and not isinstance(r[c], bool)
                                   for r in raw if c < len(r)) else "l" for c in range(ncol))
    widths = [max([len(headers[c])] + [len(r[c]) for r in body]) for c in range(ncol)]

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in body)
    return "\n".join(out)


def print_table(rows, headers=None, align=None, title=None, file=None) -> None:
    print(format_table(rows, headers, align, title), file=file, flush=True)


def bytes_arg(text: str) -> int:
    """argparse type: a byte count such as ``1.5G``, ``64M``, ``4096`` (K/M/G binary)."""
    t = text.strip().upper()
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(t.rstrip("B")[-1:], 1)
    try:
        return int(float(t.rstrip("B").rstrip("KMG") if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 1.5G or 64M, got {text!r}") from None


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def ints(text: str) -> list[int]:
    try:
        v = [int(t) for t in csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return v


def loadavg() -> float | None:
    """The 1-minute load average, None where the OS has none (a value above ~0.5 before a run
    means other work competes for the cores)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
