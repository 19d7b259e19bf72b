"""Shim: ``python benchmarks/bench_qwen3_layer.py ...`` = ``python -m llm_kernels bench
--preset qwen3-32b ...`` (the package driver :mod:`llm_kernels.bench.driver`, default preset
``qwen3-32b``). See docs/benchmarks.md."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_kernels.bench.driver import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(default_preset="qwen3-32b"))
