"""Per-row dynamic INT8 quantisation: bitwise equal to the golden ``quant_per_row``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_kernels.harness import AllClose, GoldenCase, TensorSpec, run_case
from llm_kernels.kernels.common.quant import quant_rows
from llm_kernels.numerics.quant import quant_per_row


def _row_scaled(std_exp: float, seed: int):
    """Rows with very different magnitudes (10^-6 .. 10^std_exp), one all-zero row."""
    def make(shape, dtype):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        mag = 10.0 ** torch.empty(shape[:-1] + (1,)).uniform_(-6, std_exp, generator=g)
        x = x * mag
        x.view(-1, shape[-1])[0] = 0.0  # amax clamp path
        return x.to(dtype)
    return make


CASES = [(shape, dtype) for shape in [(1, 4096), (16, 7168), (33, 100), (2, 3, 17)]
         for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_quant_rows_bitwise_vs_golden(shape, dtype):
    lead = shape[:-1]

    def golden(v):
        q, s = quant_per_row(v["x"])
        return {"q": q, "s": s.reshape(lead)}

    def impl(v):
        q, s = quant_rows(v["x"])
        return {"q": torch.from_numpy(q), "s": torch.from_numpy(s)}

    case = GoldenCase(
        name=f"quant_rows/{'x'.join(map(str, shape))}/{str(dtype)[6:]}",
        inputs=[TensorSpec("x", shape, dtype, _row_scaled(3.0, seed=len(shape) * 100 + shape[-1])),
                TensorSpec("q", shape, torch.int8, is_output=True),
                TensorSpec("s", lead, torch.float32, is_output=True)],
        golden=golden, impl=impl,
        comparators={"q": AllClose(0, 0), "s": AllClose(0, 0)})
    res = run_case(case)  # scales are > 0, so value equality is bit equality
    assert res.passed, res.outputs


def test_quant_inv_scale_uses_torch_rdiv_order():
    """127/amax is computed as fl(fl(1/amax)*127) (torch's __rtruediv__); rows where the
    correctly rounded 127/amax would quantise differently must still match the golden."""
    rng = np.random.default_rng(1)
    amax = rng.uniform(1e-3, 10, 20000).astype(np.float32)
    inv_torch = (np.float32(1) / amax) * np.float32(127)
    inv_true = np.float32(127) / amax
    idx = np.nonzero(inv_torch != inv_true)[0][:256]
    assert idx.size > 0
    # rows whose amax is such a value and whose other entries sit near .5 boundaries
    K = 64
    x = np.empty((idx.size, K), np.float32)
    for r, i in enumerate(idx):
        a = amax[i]
        x[r, 0] = a
        x[r, 1:] = (rng.integers(-126, 126, K - 1) + 0.5).astype(np.float32) * (a / np.float32(127))
    q, s = quant_rows(x)
    gq, gs = quant_per_row(torch.from_numpy(x))
    assert torch.equal(torch.from_numpy(q), gq)
    assert torch.equal(torch.from_numpy(s).view(torch.int32), gs.squeeze(-1).view(torch.int32))


def test_quant_inputs_and_errors():
    x = torch.randn(3, 8)
    q1, s1 = quant_rows(x)
    q2, s2 = quant_rows(x.numpy())
    assert (q1 == q2).all() and (s1 == s2).all()
    xb = x.to(torch.bfloat16)
    q3, _ = quant_rows(xb.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(torch.from_numpy(q3), quant_per_row(xb)[0])
    q4, s4 = quant_rows(torch.zeros(0, 8))
    assert q4.shape == (0, 8) and s4.shape == (0,)
    with pytest.raises(TypeError):
        quant_rows(np.zeros((2, 2), np.float64))
    with pytest.raises(ValueError):
        quant_rows(np.array(1.0, np.float32))
