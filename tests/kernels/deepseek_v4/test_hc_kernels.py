"""Fused hc_pre / hc_post / hc_head vs the torch reference (golden harness)."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.harness import AllClose, GoldenCase, Normal, TensorSpec, Uniform, run_case
from llm_kernels.kernels.deepseek_v4 import hc as K
from llm_kernels.reference.deepseek_v4 import hc as R

KW = dict(hc_mult=4, sinkhorn_iters=20, hc_eps=1e-6, rms_eps=1e-6)


def _specs(T, D, dtype, seed):
    return [TensorSpec("x_hc", (T, 4, D), dtype, Normal(std=1.0, seed=seed)),
            TensorSpec("hc_fn", (24, 4 * D), torch.float32, Normal(std=(4 * D) ** -0.5, seed=seed + 1)),
            TensorSpec("hc_scale", (3,), torch.float32, Uniform(0.5, 1.5, seed=seed + 2)),
            TensorSpec("hc_base", (24,), torch.float32, Normal(std=0.5, seed=seed + 3)),
            TensorSpec("x", (T, D), dtype, Normal(std=1.0, seed=seed + 4))]


# Tolerances: fp32 mixing differs from the reference only in summation order (K = 4·D
# terms): a few fp32 ulps on O(1) values -> 1e-5. bf16 outputs: one bf16 ulp of the
# value (rtol 2^-7), from a different rounding decision of an fp32 value on a tie edge.
@pytest.mark.parametrize("T,D,dtype", [(1, 7168, torch.bfloat16), (8, 4096, torch.bfloat16),
                                       (3, 100, torch.float32), (5, 128, torch.float32)])
def test_hc_kernels_match_reference(T, D, dtype):
    bf = dtype == torch.bfloat16
    out_cmp = AllClose(rtol=2 ** -7 if bf else 1e-5, atol=1e-5)
    w_cmp = AllClose(rtol=1e-5, atol=1e-6)

    def run(m):
        def f(v):
            x = v["x_hc"].float()
            xm, post, comb = m.hc_pre(x, v["hc_fn"], v["hc_scale"], v["hc_base"], dtype=dtype, **KW)
            y = m.hc_post(v["x"].float(), x, post, comb, dtype)
            head = m.hc_head(x, v["hc_fn"][:4], v["hc_scale"][:1], v["hc_base"][:4], hc_eps=1e-6,
                             rms_eps=1e-6, dtype=dtype)
            return {"x_mixed": xm, "post": post, "comb": comb, "hc_post": y, "hc_head": head}
        return f

    case = GoldenCase(f"hc/T{T}_D{D}_{dtype}", _specs(T, D, dtype, seed=T * 7 + D), run(R), run(K),
                      {"x_mixed": out_cmp, "post": w_cmp, "comb": w_cmp, "hc_post": out_cmp, "hc_head": out_cmp})
    assert run_case(case).passed


def test_hc_pre_deterministic_across_threads():
    import numba

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 4096, generator=g)
    fn = torch.randn(24, 4 * 4096, generator=g) / 128
    sc, b = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    outs = []
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(n)
        outs.append(K.hc_pre(x, fn, sc, b, dtype=torch.bfloat16, **KW))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hc_rows_independent_of_the_call(dtype):
    """Each token's outputs are the same bits alone or in a call of 5 tokens (what makes a
    speculative verify row equal a 1-row decode step); D = 1100 is 2 full column blocks and
    a partial one."""
    g = torch.Generator().manual_seed(3)
    T, D = 5, 1100
    x = torch.randn(T, 4, D, generator=g).bfloat16().float()
    fn = torch.randn(24, 4 * D, generator=g) / 64
    sc, b = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    y = torch.randn(T, D, generator=g).bfloat16().float()
    xm, post, comb = K.hc_pre(x, fn, sc, b, dtype=dtype, **KW)
    out = K.hc_post(y, x, post, comb, dtype)
    head = K.hc_head(x, fn[:4], sc[:1], b[:4], hc_eps=1e-6, rms_eps=1e-6, dtype=dtype)
    for t in range(T):
        one = K.hc_pre(x[t:t + 1], fn, sc, b, dtype=dtype, **KW)
        for a, c in zip(one, (xm, post, comb)):
            assert torch.equal(a[0], c[t])
        assert torch.equal(K.hc_post(y[t:t + 1], x[t:t + 1], post[t:t + 1], comb[t:t + 1], dtype)[0], out[t])
        assert torch.equal(K.hc_head(x[t:t + 1], fn[:4], sc[:1], b[:4], hc_eps=1e-6, rms_eps=1e-6,
                                     dtype=dtype)[0], head[t])


@pytest.mark.parametrize("T,D", [(1, 4096), (3, 1100)])
def test_hc_pre_one_dispatch_is_the_three_kernels(T, D):
    """``hc_pre`` runs ``_mix``, ``_weights`` and ``_collapse`` through one Numba dispatch
    (``_pre_all``); its outputs are the bits of the three kernels called one by one."""
    import numpy as np

    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, 4, D, generator=g).bfloat16().float().numpy()
    fn = (torch.randn(24, 4 * D, generator=g) / 64).numpy()
    sc, b = (torch.rand(3, generator=g) + 0.5).numpy(), torch.randn(24, generator=g).numpy()
    for to_bf16 in (True, False):
        bufs = [[np.empty((T, 24), np.float32), np.empty((T, 4), np.float32), np.empty((T, 4), np.float32),
                 np.empty((T, 4, 4), np.float32), np.empty((T, D), np.float32)] for _ in range(2)]
        m, pre, post, comb, out = bufs[0]
        K._mix(x.reshape(T, 4 * D), fn, np.float32(1e-6), m)
        K._weights(m, sc, b, 4, 20, np.float32(1e-6), pre, post, comb)
        K._collapse(x, pre, to_bf16, out)
        K._pre_all(x, fn, np.float32(1e-6), sc, b, 4, 20, np.float32(1e-6), to_bf16, *bufs[1])
        for a, c in zip(*bufs):
            assert np.array_equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,D", [(1, 4096), (3, 1100)])
def test_hc_pre_norm_is_hc_pre_then_rms_norm(T, D, dtype):
    """``hc_pre_norm`` (one dispatch) gives the bits of the fused ``hc_pre`` then the fused
    ``rms_norm``, and the reference's composition within the hc tolerances above."""
    from llm_kernels.kernels.deepseek_v4 import norm as KN
    from llm_kernels.reference.deepseek_v4.common import rms_norm as r_norm

    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, 4, D, generator=g).bfloat16().float()
    fn = torch.randn(24, 4 * D, generator=g) / 64
    sc, b = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    nw = (torch.rand(D, generator=g) + 0.5).bfloat16().float()
    xn, post, comb = K.hc_pre_norm(x, fn, sc, b, nw, dtype=dtype, **KW)
    xm, post1, comb1 = K.hc_pre(x, fn, sc, b, dtype=dtype, **KW)
    assert torch.equal(xn, KN.rms_norm(xm, nw, 1e-6, dtype))
    assert torch.equal(post, post1) and torch.equal(comb, comb1)
    rxn, rpost, rcomb = R.hc_pre_norm(x, fn, sc, b, nw, dtype=dtype, **KW)
    rm, _, _ = R.hc_pre(x, fn, sc, b, dtype=dtype, **KW)
    assert torch.equal(rxn, r_norm(rm, nw, 1e-6, dtype))
    # bf16: x_mixed may sit one bf16 ulp off the reference's (a tie edge, as above) and the
    # norm rounds once more: two ulps (2^-6 relative)
    tol = dict(rtol=2 ** -6 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(xn, rxn, **tol)
    torch.testing.assert_close(post, rpost, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"norm_w must be \[D="):
        K.hc_pre_norm(x, fn, sc, b, nw[:-1], dtype=dtype, **KW)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,D", [(1, 4096), (2, 64), (3, 1100)])
def test_hc_post_pre_norm_is_hc_post_then_hc_pre_norm(T, D, dtype):
    """``hc_post_pre_norm`` (one dispatch; (2, 64) runs the serial twin) gives the bits of the
    fused ``hc_post`` then the fused ``hc_pre_norm``; the reference's is its own composition."""
    g = torch.Generator().manual_seed(11)
    y = torch.randn(T, D, generator=g).bfloat16().float()
    res = torch.randn(T, 4, D, generator=g).bfloat16().float()
    post, comb = torch.rand(T, 4, generator=g) * 2, torch.rand(T, 4, 4, generator=g)
    fn = torch.randn(24, 4 * D, generator=g) / 64
    sc, b = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    nw = (torch.rand(D, generator=g) + 0.5).bfloat16().float()
    x_hc, xn, post2, comb2 = K.hc_post_pre_norm(y, res, post, comb, fn, sc, b, nw, dtype=dtype, **KW)
    x1 = K.hc_post(y, res, post, comb, dtype)
    assert torch.equal(x_hc, x1)
    for a, c in zip((xn, post2, comb2), K.hc_pre_norm(x1, fn, sc, b, nw, dtype=dtype, **KW)):
        assert torch.equal(a, c)
    r = R.hc_post_pre_norm(y, res, post, comb, fn, sc, b, nw, dtype=dtype, **KW)
    rx = R.hc_post(y, res, post, comb, dtype)
    assert torch.equal(r[0], rx)
    for a, c in zip(r[1:], R.hc_pre_norm(rx, fn, sc, b, nw, dtype=dtype, **KW)):
        assert torch.equal(a, c)
    with pytest.raises(ValueError, match=r"norm_w must be \[D="):
        K.hc_post_pre_norm(y, res, post, comb, fn, sc, b, nw[:-1], dtype=dtype, **KW)
