"""Performance side of llm_kernels: the layer benchmark and its tools.

* :mod:`.driver` — ``python -m llm_kernels bench``: ONE driver (flags, warm-up, repeats,
  round-robin rounds with a DRAM probe, JSON, plot, ``--compare``); the per-model parts are
  adapters keyed by ``model_type`` (:mod:`.adapters`: :mod:`.deepseek_v4`,
  :mod:`.qwen3`), the per-model byte models are ``llm_kernels/models/<name>/roofline.py``.
* :mod:`.core` — timing statistics, DRAM bandwidth, cold-weight rotation, paired A/B, result
  JSON with machine info, plain-text tables (re-exported here).
* :mod:`.roofline` — model-neutral roofline records and formulas.
* :mod:`.compare_runs` — ``--compare`` / ``--from-json --plot`` of result files.
* :mod:`.trace` — Chrome / Perfetto trace of ``python -m llm_kernels profile``.

See ``docs/benchmarks.md`` and ``docs/performance.md``.
"""

from .core import (
    COLD_BYTES,
    L3_BYTES,
    BenchResult,
    PairedResult,
    Rotation,
    bench,
    cold_copies,
    fmt_bytes,
    format_table,
    interleaved,
    machine_info,
    measure_dram_bandwidth,
    paired_ab,
    print_table,
    read_results,
    write_results,
)

__all__ = [
    "L3_BYTES", "COLD_BYTES", "BenchResult", "PairedResult", "bench", "interleaved", "paired_ab",
    "measure_dram_bandwidth", "cold_copies", "Rotation", "machine_info", "write_results",
    "read_results", "format_table", "print_table", "fmt_bytes", "main",
]


def main(argv=None) -> int:
    """``python -m llm_kernels bench`` (:func:`llm_kernels.bench.driver.main`)."""
    from .driver import main as _main

    return _main(argv)
