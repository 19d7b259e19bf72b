"""Fused RMSNorm + interleaved RoPE vs the reference ``rms_norm`` + ``apply_rope``."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from llm_kernels.harness import (
    AllClose,
    GoldenCase,
    Normal,
    TensorSpec,
    Uniform,
    run_case,
)
from llm_kernels.kernels.common.norm_rope import apply_rope, rms_norm, rms_norm_rope, rms_norm_rows_f32
from llm_kernels.kernels.deepseek_v4.norm import rms_norm as ds_rms_norm
from llm_kernels.reference.deepseek_v4 import common as ref


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns mapped to integers that are monotone in the float value (ulp distance)."""
    if t.dtype == torch.bfloat16:
        i = t.view(torch.int16).to(torch.int64)
        return torch.where(i < 0, -32768 - i, i)
    i = t.view(torch.int32).to(torch.int64)
    return torch.where(i < 0, -(2 ** 31) - i, i)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((_ordered(a) - _ordered(b)).abs().max())


# (T, H, D, rd): partial rope (DeepSeek-V4 q/kv: 512 lanes, 64 rope), full rope, odd D
SHAPES = [(4, 8, 512, 64), (3, 2, 128, 128), (2, 1, 100, 36), (5, 3, 8, 4)]


@pytest.mark.parametrize("T,H,D,rd", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_norm_rope_vs_reference(T, H, D, rd, dtype, weighted):
    bf = dtype == torch.bfloat16
    eps = 1e-6

    def golden(v):
        w = v["w"] if weighted else None
        n = ref.rms_norm(v["x"], w, eps, dtype)
        out = {}
        for inv in (False, True):
            y = ref.apply_rope(n, v["cos"][:, None], v["sin"][:, None], dtype, inverse=inv)
            out["y_inv" if inv else "y"] = y.to(dtype)
        return out

    def impl(v):
        w = v["w"] if weighted else None
        return {"y": rms_norm_rope(v["x"], w, v["cos"], v["sin"], eps),
                "y_inv": rms_norm_rope(v["x"], w, v["cos"], v["sin"], eps, inverse=True)}

    # Contract: fp32 a few ulp of the row scale (in practice bit-identical: the sum of
    # squares follows torch's reduction order); bf16 within 1 bf16 ulp (rtol 2^-8 + tiny).
    cmp = AllClose(rtol=2 ** -8, atol=1e-6) if bf else AllClose(rtol=4 * 2 ** -23, atol=1e-6)
    case = GoldenCase(
        name=f"norm_rope/T{T}H{H}D{D}rd{rd}/{str(dtype)[6:]}/{'w' if weighted else 'now'}",
        inputs=[TensorSpec("x", (T, H, D), dtype, Normal(std=2.0, seed=D + rd)),
                TensorSpec("w", (D,), dtype, Normal(std=0.1, mean=1.0, seed=D + 1)),
                TensorSpec("cos", (T, rd // 2), torch.float32, Uniform(-1, 1, seed=3)),
                TensorSpec("sin", (T, rd // 2), torch.float32, Uniform(-1, 1, seed=4)),
                TensorSpec("y", (T, H, D), dtype, is_output=True),
                TensorSpec("y_inv", (T, H, D), dtype, is_output=True)],
        golden=golden, impl=impl, comparators={"y": cmp, "y_inv": cmp})
    res = run_case(case)
    assert res.passed, res.outputs
    if bf:  # at most one bf16 ulp anywhere
        x = case.inputs[0].init.build((T, H, D), dtype)
        w = case.inputs[1].init.build((D,), dtype) if weighted else None
        c = case.inputs[2].init.build((T, rd // 2), torch.float32)
        s = case.inputs[3].init.build((T, rd // 2), torch.float32)
        g = ref.apply_rope(ref.rms_norm(x, w, eps, dtype), c[:, None], s[:, None], dtype).to(dtype)
        assert _ulps(rms_norm_rope(x, w, c, s, eps), g) <= 1


def test_norm_only_rope_only_and_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.5
    assert _ulps(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6, torch.float32)) <= 4
    xb = x.to(torch.bfloat16)
    assert _ulps(rms_norm(xb, None, 1e-6), ref.rms_norm(xb, None, 1e-6, torch.bfloat16).to(torch.bfloat16)) <= 1
    ang = torch.randn(6, 16, generator=g)
    c, s = ang.cos(), ang.sin()
    y = apply_rope(x, c, s)
    assert _ulps(y, ref.apply_rope(x, c, s, torch.float32)) <= 4
    # inverse undoes the rotation up to rounding
    back = apply_rope(y, c, s, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)
    # per-row tables ([R, rd/2] for x [R, D]) and numpy in -> numpy out, bf16 out of fp32 in
    yn = rms_norm_rope(x.numpy(), w.numpy(), c.numpy(), s.numpy(), 1e-6, out_dtype="bfloat16")
    assert isinstance(yn, np.ndarray) and yn.dtype == np.uint16
    yt = rms_norm_rope(x, w, c, s, 1e-6, out_dtype=torch.bfloat16)
    assert yt.dtype == torch.bfloat16 and (yt.view(torch.int16).numpy().view(np.uint16) == yn).all()


def test_norm_rope_determinism_threads():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, 512, generator=g).to(torch.bfloat16)
    w = (torch.rand(512, generator=g) + 0.5).to(torch.bfloat16)
    ang = torch.randn(16, 32, generator=g)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        a = rms_norm_rope(x, w, ang.cos(), ang.sin(), 1e-6)
        numba.set_num_threads(1)
        b = rms_norm_rope(x, w, ang.cos(), ang.sin(), 1e-6)
    finally:
        numba.set_num_threads(old)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_norm_rope_errors():
    x = torch.randn(2, 3, 16)
    c = torch.ones(2, 4)
    with pytest.raises(ValueError):
        rms_norm_rope(x, torch.ones(15), c, c)
    with pytest.raises(ValueError):
        rms_norm_rope(x, None, c, None)
    with pytest.raises(ValueError):
        rms_norm_rope(x, None, torch.ones(2, 9), torch.ones(2, 9))  # rd = 18 > D
    with pytest.raises(ValueError):
        rms_norm_rope(x, None, torch.ones(3, 4), torch.ones(3, 4))  # leading dims
    with pytest.raises(ValueError):
        rms_norm_rope(x, None, c, c, out_dtype="float16")
    with pytest.raises(TypeError):
        rms_norm_rope(np.zeros((2, 4), np.float64))


@pytest.mark.parametrize("R,D", [(1, 4096), (4, 4096), (7, 1000), (3, 5)])
def test_rms_norm_rows_f32_equals_the_wrapper_bitwise(R, D):
    """The decode path's float32-in / float32-out entry (``rms_norm_rows_f32``, used by the
    DeepSeek-V4 fused ``rms_norm``) gives the bits of ``rms_norm`` + ``.float()``."""
    g = torch.Generator().manual_seed(R * 31 + D)
    x = torch.randn(R, D, generator=g) * 3
    for w in (torch.rand(D, generator=g).bfloat16(), torch.rand(D, generator=g), None):
        for bf in (True, False):
            ref = rms_norm(x, w, 1e-6, out_dtype="bfloat16" if bf else "float32").float()
            wf = None if w is None else w.float().numpy()
            got = rms_norm_rows_f32(x.numpy(), wf, 1e-6, bf)
            assert np.array_equal(got.view(np.int32), ref.numpy().view(np.int32))
            ds = ds_rms_norm(x, w, 1e-6, torch.bfloat16 if bf else torch.float32)
            assert torch.equal(ds.view(torch.int32), ref.view(torch.int32))
    with pytest.raises(ValueError, match="float32"):
        rms_norm_rows_f32(x.numpy().astype(np.float64), None, 1e-6, True)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_rows_f32(x.numpy(), np.ones(D + 1, np.float32), 1e-6, True)
