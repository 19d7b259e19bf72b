"""Load-time weight passes (``kernels/common/weight_quant.py``) against their torch goldens:
the per-row INT8 quantiser bit for bit, the NaN/Inf count exactly."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.kernels.common.weight_quant import count_nonfinite, quantize_weight_fast, quantize_weight_grouped_fast
from llm_kernels.numerics.group_quant import quantize_weight_grouped
from llm_kernels.numerics.quant import quantize_weight


def _edge_weight(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(67, 300, generator=g) * 0.05
    w[0] = 0.0                                   # all-zero row: amax clamped at 1e-4
    w[1, :5] = 3e-5                              # below the clamp
    w[2] = torch.arange(300) / 299.0 - 0.5       # many rint half-way candidates
    w[3, 7] = 65000.0                            # one huge value
    w[4] = -w[4].abs()                           # amax from a negative value
    w[5, ::2] = 1.0
    w[5, 1::2] = -0.5039                         # ties after scaling
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_weight_fast_is_the_golden_bit_for_bit(dtype):
    w = _edge_weight(dtype)
    a, b = quantize_weight(w), quantize_weight_fast(w)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale.view(torch.int32), b.scale.view(torch.int32))


def test_quantize_weight_fast_non_contiguous_and_fallbacks():
    w = _edge_weight(torch.float32)
    t = w.t()  # non-contiguous [300, 67]
    assert torch.equal(quantize_weight_fast(t).qweight, quantize_weight(t).qweight)
    h = w.to(torch.float16)  # another dtype: the golden itself
    assert torch.equal(quantize_weight_fast(h).qweight, quantize_weight(h).qweight)
    n = w.clone()
    n[9, 3] = float("nan")  # a NaN row: the golden decides (same result object contents)
    a, b = quantize_weight(n), quantize_weight_fast(n)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale.isnan(), b.scale.isnan())
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_fast(torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_count_nonfinite_exact(dtype):
    t = torch.randn(5, 70001).to(dtype)  # spans several 64K blocks, odd tail
    assert count_nonfinite(t) == 0
    flat = t.view(-1)
    places = [0, 65535, 65536, 200000, flat.numel() - 1]
    for i, v in zip(places, [float("nan"), float("inf"), float("-inf"), float("nan"), float("inf")]):
        flat[i] = v
    assert count_nonfinite(t) == len(places) == int((~torch.isfinite(t)).sum())
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert count_nonfinite(big) == 0  # largest finite value: exponent not all ones
    assert count_nonfinite(t[:, ::3]) == int((~torch.isfinite(t[:, ::3])).sum())
    assert count_nonfinite(torch.empty(0, dtype=dtype)) == 0
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        count_nonfinite(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_weight_grouped_fast_is_the_golden_bit_for_bit(dtype, group):
    w = _edge_weight(dtype)[:, :256]
    w[6, :32] = 2e-3   # float16-subnormal scales (the golden's round-up case)
    w[7, 32:64] = 7e-3
    a, b = quantize_weight_grouped(w, group), quantize_weight_grouped_fast(w, group)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
    assert b.group_size == group


def test_quantize_weight_grouped_fast_fallbacks():
    w = _edge_weight(torch.float32)[:, :256].clone()
    w[2, 40] = float("nan")
    a, b = quantize_weight_grouped(w, 32), quantize_weight_grouped_fast(w, 32)
    assert torch.equal(a.qweight, b.qweight)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_weight_grouped_fast(w[:, :250], 32)
