"""Acceptance (issue 9): ``python -m llm_kernels bench`` works from a NON-editable install,
run outside the repository: the driver and adapters are package modules, nothing is read
from ``benchmarks/``, and the result JSON lands in the current folder.

A fresh venv would have to download torch, so the wheel is built from a copy of the sources
and installed with ``pip install --no-deps --target <tmp>/site``; it runs with the project
venv's python (for the dependencies) and ``PYTHONPATH=<tmp>/site``, cwd = a temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_from_installed_wheel_outside_the_repo(tmp_path):
    src = tmp_path / "src"   # a copy, so the build writes no build/ or egg-info into the checkout
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "llm_kernels", src / "llm_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(site), str(src)], check=True, cwd=tmp_path)
    shutil.rmtree(src)
    assert (site / "llm_kernels" / "bench" / "driver.py").is_file()
    assert not (site / "benchmarks").exists()
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def bench(*argv):
        return subprocess.run([sys.executable, "-m", "llm_kernels", "bench", *argv], cwd=run, env=env,
                              capture_output=True, text=True, timeout=900)

    r = bench("--help")
    assert r.returncode == 0, r.stderr
    assert "--preset" in r.stdout and "--compare" in r.stdout and "--tokens" in r.stdout
    r = bench("--preset", "mini", "--tokens", "1", "--context", "16", "--layer-types", "swa", "--repeats", "1",
              "--warmup", "1", "--backends", "reference", "--quant", "none", "--no-transformers", "--no-lm-head",
              "--bw-bytes", "64M")
    assert r.returncode == 0, r.stdout + r.stderr
    where = next(ln for ln in r.stdout.splitlines() if ln.startswith("llm_kernels: "))
    assert str(site) in where and str(ROOT) not in where, where
    d = json.loads((run / "bench_mini.json").read_text())
    assert Path(d["llm_kernels"]).is_relative_to(site)
    assert d["benchmark"] == "bench_layer" and [r["backend"] for r in d["results"]] == ["reference"]
    r = bench("--preset", "qwen3-mini", "--batch", "1", "--context", "8", "--repeats", "1", "--warmup", "1",
              "--backends", "reference", "--quant", "none", "--no-transformers", "--bandwidth", "40",
              "--json", "q.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((run / "q.json").read_text())["benchmark"] == "bench_qwen3_layer"
