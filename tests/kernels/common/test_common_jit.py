"""Kernel infrastructure: CPU dispatch, env override, source-hash cache keying, njit_kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np

from llm_kernels.kernels.common import jit

REPO = Path(__file__).resolve().parents[3]


def test_feature_flags_consistent():
    feats = jit.CPU_FEATURES
    assert isinstance(feats, dict)
    assert jit.HAS_VNNI == (feats.get("avx512f", False) and feats.get("avx512bw", False)
                            and feats.get("avx512vnni", False))
    assert jit.HAS_AVX512BF16 == (feats.get("avx512f", False) and feats.get("avx512bf16", False))
    assert jit.HAS_AVX2 == (feats.get("avx2", False) and feats.get("fma", False))
    rank = jit.TIERS.index(jit.TIER)
    assert rank <= jit.TIERS.index(jit.CPU_TIER)
    assert jit.USE_VNNI == (rank >= jit.TIERS.index("avx512-vnni"))
    assert jit.USE_BF16 == (jit.TIER == "avx512-vnni-bf16")
    assert jit.USE_INT8_TILES == (rank >= jit.TIERS.index("avx2"))
    assert jit.dispatch_path() == (jit.INT8_TILE if jit.USE_INT8_TILES else "fallback")
    assert jit.dispatch_tier() == jit.TIER
    info = jit.dispatch_info()
    assert info["path"] == jit.dispatch_path() and info["source_hash"] == jit.SOURCE_HASH
    assert info["tier"] == jit.TIER and info["cpu_tier"] == jit.CPU_TIER


def test_cache_dir_keyed_on_kernel_sources():
    # (not compared with a fresh kernel_source_hash(): files may be edited while tests run)
    assert len(jit.SOURCE_HASH) == 16 and int(jit.SOURCE_HASH, 16) >= 0
    if not jit.dispatch_info()["cache_dir_from_user"]:  # .../numba/<source hash>/<tier>
        assert Path(jit.kernel_cache_dir()).name == jit.TIER
        assert Path(jit.kernel_cache_dir()).parent.name == jit.SOURCE_HASH
        assert numba.config.CACHE_DIR == jit.kernel_cache_dir()


def test_source_hash_changes_with_any_kernel_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "helper.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "main.py").write_text("from .a.helper import f\n")
    h0 = jit.kernel_source_hash(tmp_path)
    assert h0 == jit.kernel_source_hash(tmp_path)
    (tmp_path / "a" / "helper.py").write_text("def f(x):\n    return x + 2\n")  # helper edit
    h1 = jit.kernel_source_hash(tmp_path)
    assert h1 != h0
    (tmp_path / "b.py").write_text("")  # a new module also counts
    assert jit.kernel_source_hash(tmp_path) != h1


def test_source_hash_covers_every_kernel_module():
    """The hash walks ``llm_kernels/kernels/**/*.py``: split-out and new modules count."""
    from pathlib import Path

    root = Path(jit.__file__).resolve().parent.parent
    mods = {p.relative_to(root).as_posix() for p in root.rglob("*.py")}
    assert {"common/gemm_pack.py", "common/prepared.py", "deepseek_v4/prepare.py", "deepseek_v4/output_proj.py",
            "qwen3/prepare.py"} <= mods
    assert jit.kernel_source_hash(root) == jit.kernel_source_hash()


def test_threading_layer_pinned_to_omp():
    if os.environ.get("NUMBA_THREADING_LAYER", "omp") == "omp":
        assert str(numba.config.THREADING_LAYER) in ("omp", "default")


@jit.njit_kernel
def _bare(x):
    return x + 1


@jit.njit_kernel(parallel=True)
def _par(a, out):
    for i in numba.prange(a.size):
        out[i] = a[i] * 2


def test_njit_kernel_decorator_forms():
    assert _bare(1) == 2
    a = np.arange(10, dtype=np.int64)
    out = np.empty_like(a)
    _par(a, out)
    assert (out == 2 * a).all()
    assert type(_bare._cache).__name__ != "NullCache"  # cache=True by default
    assert _par.targetoptions["parallel"] is True


def test_force_fallback_env_in_subprocess():
    """LLM_KERNELS_FORCE_FALLBACK=1 selects the plain kernels everywhere, and they are exact:
    bitwise the golden ``w8a8_linear`` in the child, and bitwise this process's fast path
    (the register-tile layout, forced here so that the comparison also holds when pytest
    itself runs with the fallback forced) on the same inputs: both are the exact INT32 dot product and
    the same fp32 dequant."""
    code = textwrap.dedent("""
        import json, torch
        from llm_kernels.kernels.common import jit, W8A8Linear
        from llm_kernels.numerics.quant import quantize_weight, w8a8_linear
        assert jit.FORCE_FALLBACK and not jit.USE_VNNI, jit.dispatch_info()
        assert jit.dispatch_path() == "fallback"
        g = torch.Generator().manual_seed(0)
        w = torch.randn(37, 100, generator=g)
        x = torch.randn(3, 100, generator=g)
        qw = quantize_weight(w)
        lin = W8A8Linear.from_quant_weight(qw)
        assert lin.layout == "nk", lin.layout
        y = lin(x)
        assert torch.equal(y.view(torch.int32), w8a8_linear(x, qw).view(torch.int32))
        print("FALLBACK-OK")
        print(json.dumps(y.view(torch.int32).flatten().tolist()))
    """)
    env = dict(os.environ, LLM_KERNELS_FORCE_FALLBACK="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FALLBACK-OK" in r.stdout
    if not jit.INT8_TILE:
        return  # the fallback is this CPU's only path (compared with the golden above)
    import json

    import torch

    from llm_kernels.kernels.common import W8A8Linear
    from llm_kernels.numerics.quant import quantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 100, generator=g)
    x = torch.randn(3, 100, generator=g)
    fast = W8A8Linear.from_quant_weight(quantize_weight(w), layout=jit.INT8_TILE)
    assert fast.layout == jit.INT8_TILE
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    assert fast(x).view(torch.int32).flatten().tolist() == plain
