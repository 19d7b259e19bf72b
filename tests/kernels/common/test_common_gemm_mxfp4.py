"""The W4A8 GEMM on MXFP4 weights kept 4-bit (:mod:`llm_kernels.kernels.common.gemm_mxfp4`):
the packed layout (4 bits per weight + 1 scale byte per 32, bitwise round trip), the exact
UE8M0 scale decode, and the fused kernel of every tier **bitwise equal** to the golden
:func:`llm_kernels.numerics.mxfp4.mxfp4_linear` (this process's tier here; the plain and AVX2
tiers in child processes, compared with this one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernel_tiers as KT
from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.gemm_mxfp4 import e8m0_to_f32, mxfp4_gemm_linear, pack_mxfp4, unpack_mxfp4
from llm_kernels.kernels.common.x86_w4a8 import E2M1_X2_ZP, TS_MAX, ZP, w4_plan
from llm_kernels.numerics.mxfp4 import E2M1_X2, MXFP4Weight, mxfp4_linear, quantize_mxfp4

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
BF16, F32 = torch.bfloat16, torch.float32


def _w(n, k, seed) -> MXFP4Weight:
    """A quantised random weight with every code, an all-zero block, and scale bytes at the
    subnormal / normal edges (0, 1, 2, 3) and far from 127."""
    g = torch.Generator().manual_seed(seed)
    w = quantize_mxfp4(torch.randn(n, k, generator=g) / k ** 0.5)
    packed = w.packed.clone()
    scale = w.scale.clone()
    packed[0, : min(8, k // 2)] = torch.tensor([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE],
                                               dtype=torch.uint8)[: min(8, k // 2)]
    packed[n // 3, :16] = 0                                 # an all-zero block
    edges = torch.tensor([0, 1, 2, 3, 126, 128, 160, 90], dtype=torch.uint8)
    scale[n - 1, : min(8, k // 32)] = edges[: min(8, k // 32)]
    return MXFP4Weight(packed, scale)


def _x(t, k, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g) * 3).to(dtype)


def test_e8m0_to_f32_is_exact_on_every_byte():
    want = torch.ldexp(torch.ones(255), torch.arange(255) - 128).numpy()
    got = np.array([e8m0_to_f32(np.uint8(b)) for b in range(255)], np.float32)
    assert np.array_equal(got, want)
    assert got[0] == np.float32(2.0 ** -128) and got[1] == np.float32(2.0 ** -127)   # subnormals


def test_decode_table_is_twice_e2m1_plus_the_zero_point():
    assert E2M1_X2_ZP == tuple(v + ZP for v in E2M1_X2)
    assert min(E2M1_X2_ZP) >= 0                              # the unsigned operand
    assert 4 * 2 * max(E2M1_X2_ZP) * 127 <= 32767             # AVX2: 4 pair sums exact in int16


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
def test_plans_cover_every_tile_once(isa):
    from llm_kernels.kernels.common.gemm import TILE_HEIGHTS

    unit = 16 if isa == "vnni" else 8
    for tt in TILE_HEIGHTS:
        cover = np.zeros((tt, 64), int)
        for t0, ts, u0, us in w4_plan(isa, tt):
            assert ts <= TS_MAX[isa]
            cover[t0:t0 + ts, u0 * unit:(u0 + us) * unit] += 1
        assert (cover == 1).all(), (isa, tt)


@pytest.mark.parametrize("N,K", [(70, 96), (130, 1088), (64, 32)])
def test_pack_keeps_four_bits_and_round_trips(N, K):
    w = _w(N, K, 1)
    for layout in ("w4", "nk") if jit.INT8_TILE else ("nk",):
        pw = pack_mxfp4(w, layout)
        u = unpack_mxfp4(pw)
        assert torch.equal(u.packed, w.packed) and torch.equal(u.scale, w.scale)
        assert pw.nbytes == pw.np_ * (K // 2 + K // 32)      # 4 bits per weight + 1 byte per 32
        assert pw.data.dtype == np.uint8 and pw.sw8.dtype == np.uint8


# every tile height (1-6, 8, 12, 16), padded remainders and the K-blocked prefill path
CASES = [(T, K, N) for T in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 17, 40) for K, N in ((96, 70), (1088, 130))]


def _cases_outputs(cases=CASES) -> dict[str, np.ndarray]:
    out = {}
    for i, (T, K, N) in enumerate(cases):
        pw = pack_mxfp4(_w(N, K, 10 + i))
        for dt in (F32, BF16):
            out[f"{T}/{K}/{N}/{dt}"] = mxfp4_gemm_linear(_x(T, K, 100 + i, dt), pw).numpy()
    return out


@pytest.mark.parametrize("T,K,N", CASES)
def test_fused_is_bitwise_the_golden(T, K, N):
    w = _w(N, K, 7)
    pw = pack_mxfp4(w)
    for dt in (F32, BF16):
        x = _x(T, K, 8, dt)
        assert torch.equal(mxfp4_gemm_linear(x, pw), mxfp4_linear(x, w)), (jit.TIER, dt)
    # leading dims and numpy in/out
    x3 = _x(2 * T, K, 9, F32).reshape(2, T, K)
    y = mxfp4_gemm_linear(x3.numpy(), pw)
    assert isinstance(y, np.ndarray) and y.shape == (2, T, N)
    assert np.array_equal(y, mxfp4_linear(x3, w).numpy())


def test_plain_layout_is_bitwise_the_golden():
    w = _w(70, 96, 3)
    pw = pack_mxfp4(w, "nk")
    assert pw.data is not None and pw.layout == "nk"
    for T in (1, 5, 17):
        x = _x(T, 96, 4, BF16)
        assert torch.equal(mxfp4_gemm_linear(x, pw), mxfp4_linear(x, w))


def test_errors_name_the_problem():
    w = _w(8, 64, 1)
    pw = pack_mxfp4(w)
    with pytest.raises(ValueError, match="K=64"):
        mxfp4_gemm_linear(torch.randn(2, 32), pw)
    with pytest.raises(TypeError, match="MXFP4Weight"):
        pack_mxfp4(w.packed)
    with pytest.raises(ValueError, match="unknown layout"):
        pack_mxfp4(w, "kn")
    bad = MXFP4Weight(w.packed, torch.full_like(w.scale, 255))
    with pytest.raises(ValueError, match="255"):
        pack_mxfp4(bad)


_CHILD = r"""
import sys, numpy as np
sys.path[:0] = sys.argv[1:3]
from llm_kernels.kernels.common import jit
assert jit.TIER == sys.argv[4], jit.dispatch_info()
from test_common_gemm_mxfp4 import _cases_outputs
np.savez(sys.argv[3], **_cases_outputs())
print("CHILD-OK", jit.TIER, jit.dispatch_path())
"""


def _child(tier: str, tmp_path) -> dict[str, np.ndarray]:
    env = dict(os.environ, LLM_KERNELS_TIER=tier)
    env.pop(jit.FORCE_FALLBACK_ENV, None)
    out = tmp_path / f"{tier}.npz"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), str(HERE.parent), str(out), tier], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "CHILD-OK" in r.stdout, r.stdout[-2000:]
    return dict(np.load(out))


@pytest.mark.parametrize("tier", ["plain", "avx2"])
def test_other_tiers_match_this_one(tier, tmp_path):
    """The plain and AVX2 W4A8 kernels (child processes forced to that tier) give the same
    bits as this process's tier on every case (all equal to the golden)."""
    if tier == "avx2" and KT.rank(KT.supported_tier()) < KT.rank("avx2"):
        pytest.skip("needs the avx2 tier (AVX2, FMA): this CPU lacks it")
    if tier == jit.TIER:
        pytest.skip(f"this process already runs tier {tier} (covered by test_fused_is_bitwise_the_golden)")
    child, here = _child(tier, tmp_path), _cases_outputs()
    assert child.keys() == here.keys()
    for k, v in here.items():
        assert np.array_equal(v, child[k]), f"{k}: {tier} vs {jit.TIER}"
