"""FP8 e4m3 block-scaled numerics (:mod:`llm_kernels.numerics.fp8`): exact decode, the
writer's round trip per scale format, partial edge blocks, and the dequantizer transformers
uses on DeepSeek-V4 / Qwen3-FP8 releases."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.numerics.fp8 import (
    E4M3_MAX,
    check_fp8_scale,
    dequantize_fp8_blocks,
    e8m0_to_float,
    quantize_fp8_blocks,
)


@pytest.mark.parametrize("fmt", ["ue8m0", "bf16", "float"])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (5, 7)])
def test_round_trip_and_bound(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q, s = quantize_fp8_blocks(w, (128, 128), fmt)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_fp8_blocks(q, s)
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 |w| in the normal range, and at most half
    # the subnormal step (2^-10 · scale) below it
    sf = e8m0_to_float(s) if fmt == "ue8m0" else s.float()
    step = sf.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]] * 2**-10
    assert bool(((d - w).abs() <= w.abs() * 2**-4 + step).all())
    q2, s2 = quantize_fp8_blocks(d, (128, 128), fmt)
    assert torch.equal(dequantize_fp8_blocks(q2, s2), d)  # values on the grid come back exactly


def test_ue8m0_scale_is_smallest_power_of_two_without_clipping():
    w = torch.zeros(128, 128)
    w[3, 5] = 449.0  # needs scale 2 (449/448 > 1)
    q, s = quantize_fp8_blocks(w)
    assert float(e8m0_to_float(s)[0, 0]) == 2.0
    assert float(q.float().abs().max()) <= E4M3_MAX
    q, s = quantize_fp8_blocks(torch.zeros(4, 4))
    assert s.view(torch.uint8).tolist() == [[127]]


def test_dequant_matches_transformers():
    tr = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    q, s = quantize_fp8_blocks(w)
    theirs = tr.Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
    assert torch.equal(theirs, dequantize_fp8_blocks(q, s))


def test_bad_scales_named():
    s = torch.tensor([[127, 255]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert "NaN" in check_fp8_scale(s) or "nan" in check_fp8_scale(s)
    assert check_fp8_scale(torch.tensor([[1.0, 0.0]])) is not None
    assert check_fp8_scale(torch.tensor([[1.0, 2.0]])) is None
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        dequantize_fp8_blocks(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 1))
