"""MXFP4 numerics (:mod:`llm_kernels.numerics.mxfp4`): the E2M1 grid, the writer's
round trip, the nibble order transformers reads, and the W4A8 golden against float math."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_kernels.numerics.group_quant import quant_groups
from llm_kernels.numerics.mxfp4 import E2M1_VALUES, MXFP4Weight, mxfp4_linear, quantize_mxfp4, unpack_e2m1_x2


def test_e2m1_doubled_integers_are_the_grid():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(256, 1)
    x2 = unpack_e2m1_x2(codes)
    assert x2[:, 0].tolist() == [int(2 * E2M1_VALUES[c & 0xF]) for c in range(256)]
    assert x2[:, 1].tolist() == [int(2 * E2M1_VALUES[c >> 4]) for c in range(256)]


def test_nibble_order_matches_transformers_unpacker():
    tr = pytest.importorskip("transformers.integrations.finegrained_fp8")
    g = torch.Generator().manual_seed(1)
    w = MXFP4Weight(torch.randint(0, 256, (8, 32), generator=g, dtype=torch.uint8),
                    torch.randint(120, 135, (8, 2), generator=g, dtype=torch.uint8))
    deq = tr.Fp8Dequantize(None)._dequantize_one(w.packed.view(torch.int8), w.scale.view(torch.float8_e8m0fnu),
                                                 torch.float32)
    assert torch.equal(deq, w.dequantize())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(-20, 20))
def test_grid_values_round_trip_exactly(seed, e):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    vals = torch.tensor(E2M1_VALUES)[codes] * 2.0 ** e
    vals[:, ::32] = 6.0 * 2.0 ** e  # every block's amax needs exponent e
    m = quantize_mxfp4(vals)
    assert torch.equal(m.dequantize(), vals)
    assert torch.equal(quantize_mxfp4(m.dequantize()).dequantize(), m.dequantize())


def test_writer_rounds_to_nearest_without_clipping():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    m = quantize_mxfp4(w)
    d = m.dequantize().view(16, 4, 32)
    wb = w.view(16, 4, 32)
    s = m.scale_f32()[:, :, None] * 2  # 2^(byte-127)
    assert bool(((wb.abs() / s) <= 6).all())                 # no clipping
    # nearest grid value: error at most half the local grid step (step <= 2 in units of s)
    assert bool(((d - wb).abs() <= s * 1.0 + 0).all())
    assert bool(((d - wb).abs() <= (wb.abs() / 4 + s / 4) + 1e-7).all())


def test_all_zero_block_and_bad_shapes():
    m = quantize_mxfp4(torch.zeros(2, 32))
    assert m.scale.tolist() == [[127], [127]] and int(m.packed.sum()) == 0
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="scale must be"):
        MXFP4Weight(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        MXFP4Weight(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, 1, dtype=torch.uint8))


def test_w4a8_golden_is_the_dequantized_product_of_quantized_activations():
    g = torch.Generator().manual_seed(3)
    w = quantize_mxfp4(torch.randn(24, 96, generator=g))
    x = torch.randn(5, 96, generator=g)
    y = mxfp4_linear(x, w)
    q, s = quant_groups(x, 32)
    xd = (q.float().view(5, 3, 32) * s[:, :, None]).view(5, 96)
    ref = xd.double() @ w.dequantize().double().T
    # float32 rounding of isum*s_x and of the 3-term running sum only
    assert torch.allclose(y.double(), ref, rtol=0, atol=4 * 2**-24 * float(ref.abs().max()) * 3)


def test_ties_round_to_the_even_code():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0]  # halfway between grid neighbours
    got = quantize_mxfp4(torch.tensor([mids * 4])).dequantize()[0, :8].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]  # amax 5 -> scale 1
