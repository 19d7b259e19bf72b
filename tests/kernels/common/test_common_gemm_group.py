"""The group-scaled INT8 GEMM (``int8_g32``): the golden (:mod:`llm_kernels.numerics.group_quant`)
against an independent integer/float32 evaluation of its definition, the weight quantiser's
invariants, and the fused kernel of every tier **bitwise equal** to the golden (this
process's tier here; the plain and AVX2 tiers in child processes, compared with this one).
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
from llm_kernels.kernels.common.gemm_group import group_gemm_linear, pack_group_w8, unpack_group_w8
from llm_kernels.numerics.group_quant import (
    GroupQuantWeight,
    f16_round_up,
    group_linear,
    quant_groups,
    quantize_weight_grouped,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
BF16, F32 = torch.bfloat16, torch.float32


def _w(n, k, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale / k ** 0.5
    w[: max(1, n // 7), :32] = 0.0          # an all-zero block (amax clamp)
    w[n // 2, 5] = 40.0 * scale / k ** 0.5  # an outlier in one block
    return w


def _x(t, k, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g) * 3).to(dtype)


def test_f16_round_up_is_the_next_f16_value():
    s = torch.tensor([1.0, 1.0 + 2 ** -12, 1.0 + 2 ** -10, 3.0e-7, 0.0078125, 1.2345678, 7.87e-7], dtype=F32)
    up = f16_round_up(s)
    assert up.dtype == torch.float16
    upf = up.float()
    assert bool((upf >= s).all())                          # never below (no clipping)
    down = (up.view(torch.int16) - 1).view(torch.float16).float()
    assert bool((down < s).all())                          # the smallest such value
    assert upf[0] == 1.0 and upf[4] == 0.0078125 and upf[2] == 1.0 + 2 ** -10   # exact values stay
    assert upf[1] == 1.0 + 2 ** -10                        # rounded up, not to nearest


def test_f16_bits_to_f32_is_exact_on_every_non_negative_finite_value():
    from llm_kernels.kernels.common.gemm_group import f16_bits_to_f32

    bits = np.arange(0x7C00, dtype=np.uint16)              # +0 .. largest finite
    got = np.array([f16_bits_to_f32(b) for b in bits[::97]], np.float32)
    assert np.array_equal(got, bits[::97].view(np.float16).astype(np.float32))
    for b in (0, 1, 0x3FF, 0x400, 0x3C00, 0x7BFF):
        assert f16_bits_to_f32(np.uint16(b)) == np.float32(np.uint16(b).view(np.float16))


def test_quantize_weight_grouped_invariants():
    w = _w(70, 96, 1)
    q = quantize_weight_grouped(w)
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float16 and tuple(q.scale.shape) == (70, 3)
    assert int(q.qweight.abs().max()) <= 127
    blocks = w.view(70, 3, 32)
    amax = blocks.abs().amax(-1).clamp(min=1e-4)
    s = q.scale.float()
    assert bool((torch.round(amax / s) <= 127).all())      # the block maximum never clips
    normal = s >= 2.0 ** -14                               # float16 normals: the nearest value (half an ulp)
    assert bool(((s[normal] - (amax / 127)[normal]).abs() <= (amax / 127)[normal] * 2 ** -11).all())
    assert not bool(normal.all())                          # the all-zero block's scale is subnormal
    err = (q.dequantize().view(70, 3, 32) - blocks).abs()
    assert bool((err <= s.unsqueeze(-1) / 2 * (1 + 1e-6)).all())   # round to nearest on the stored scale
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_weight_grouped(torch.randn(4, 40))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_grouped(torch.randn(4))
    with pytest.raises(TypeError, match="float16"):
        GroupQuantWeight(q.qweight, q.scale.float())
    with pytest.raises(ValueError, match=r"\[70, 3\]"):
        GroupQuantWeight(q.qweight, q.scale[:, :2].contiguous())


def test_golden_matches_its_definition():
    """``group_linear`` against the module docstring's formula evaluated independently:
    int64 block sums in numpy, then the float32 fold in block order, element by element."""
    w = quantize_weight_grouped(_w(9, 96, 2))
    x = _x(4, 96, 3, F32)
    y = group_linear(x, w).numpy()
    qx, sx = (a.numpy() for a in quant_groups(x))
    qw, sw = w.qweight.numpy().astype(np.int64), w.scale.float().numpy()
    for t in range(4):
        for n in range(9):
            acc = np.float32(0.0)
            for g in range(3):
                isum = int((qx[t, 32 * g:32 * g + 32].astype(np.int64) * qw[n, 32 * g:32 * g + 32]).sum())
                acc = np.float32(acc + np.float32(np.float32(np.float32(isum) * sx[t, g]) * sw[n, g]))
            assert y[t, n] == acc, (t, n)
    # and it approximates the float product (a sanity bound, not a numerics claim)
    ref = x @ w.dequantize().T
    assert torch.allclose(torch.from_numpy(y), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


# every register-tile height (1-6, 8, 12, 16), padded remainders and the K-blocked prefill path
CASES = [(T, K, N) for T in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 17, 40) for K, N in ((96, 70), (1088, 130))]


def _cases_outputs(cases=CASES) -> dict[str, np.ndarray]:
    out = {}
    for i, (T, K, N) in enumerate(cases):
        w = quantize_weight_grouped(_w(N, K, 10 + i))
        pw = pack_group_w8(w)
        assert torch.equal(unpack_group_w8(pw).qweight, w.qweight)
        for dt in (F32, BF16):
            out[f"{T}/{K}/{N}/{dt}"] = group_gemm_linear(_x(T, K, 100 + i, dt), pw).numpy()
    return out


@pytest.mark.parametrize("T,K,N", CASES)
def test_fused_is_bitwise_the_golden(T, K, N):
    w = quantize_weight_grouped(_w(N, K, 7))
    pw = pack_group_w8(w)
    for dt in (F32, BF16):
        x = _x(T, K, 8, dt)
        assert torch.equal(group_gemm_linear(x, pw), group_linear(x, w)), (jit.TIER, dt)
    # leading dims and numpy in/out
    x3 = _x(2 * T, K, 9, F32).reshape(2, T, K)
    y = group_gemm_linear(x3.numpy(), pw)
    assert isinstance(y, np.ndarray) and y.shape == (2, T, N)
    assert np.array_equal(y, group_linear(x3, w).numpy())


def test_errors_name_the_problem():
    w = quantize_weight_grouped(_w(8, 64, 1))
    pw = pack_group_w8(w)
    with pytest.raises(ValueError, match="K=64"):
        group_gemm_linear(torch.randn(2, 32), pw)
    with pytest.raises(TypeError, match="GroupQuantWeight"):
        pack_group_w8(w.qweight)
    other = {"vnni": "avx2", "avx2": "vnni"}.get(jit.INT8_TILE, "vnni")
    with pytest.raises(RuntimeError, match=other):
        pack_group_w8(w, other)
    with pytest.raises(ValueError, match="unknown layout"):
        pack_group_w8(w, "kn")


_CHILD = r"""
import sys, numpy as np
sys.path[:0] = sys.argv[1:3]
from llm_kernels.kernels.common import jit
assert jit.TIER == sys.argv[4], jit.dispatch_info()
from test_common_gemm_group import _cases_outputs
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
    """The plain and AVX2 grouped kernels (child processes forced to that tier) give the
    same bits as this process's tier on every case (all equal to the golden)."""
    if tier == "avx2" and KT.rank(KT.supported_tier()) < KT.rank("avx2"):
        pytest.skip("needs the avx2 tier (AVX2, FMA): this CPU lacks it")
    if tier == jit.TIER:
        pytest.skip(f"this process already runs tier {tier} (covered by test_fused_is_bitwise_the_golden)")
    child, here = _child(tier, tmp_path), _cases_outputs()
    assert child.keys() == here.keys()
    for k, v in here.items():
        assert np.array_equal(v, child[k]), f"{k}: {tier} vs {jit.TIER}"
