"""Tests for llm_kernels.harness.compare."""

import math

import numpy as np
import pytest
import torch

from llm_kernels.harness import (
    AllClose, CosineAtLeast, RatioAllClose, TopKTieAware, error_report,
)


# ------------------------------------------------------------------ AllClose
def test_allclose_pass_and_single_perturbation_fails():
    e = torch.linspace(-1, 1, 60).reshape(3, 4, 5)
    a = e + 1e-6
    r = AllClose(rtol=1e-5, atol=1e-5)(a, e)
    assert r.passed and "ok" in r.message and r.report is not None
    a = e.clone()
    a[1, 2, 3] += 1e-3
    r = AllClose(rtol=1e-5, atol=1e-5)(a, e)
    assert not r.passed
    assert "1/60 mismatched" in r.message
    assert "(1, 2, 3)" in r.message
    assert f"expected={float(e[1, 2, 3]):.6g}" in r.message
    assert "\n" not in r.message


def test_allclose_tolerance_is_relative_to_expected():
    e = torch.tensor([100.0])
    assert AllClose(rtol=1e-2, atol=0)(torch.tensor([100.9]), e).passed
    assert not AllClose(rtol=1e-2, atol=0)(torch.tensor([101.1]), e).passed


def test_allclose_shape_kind_and_type_mismatch_fail_cleanly():
    cmp = AllClose(rtol=0, atol=0)
    r = cmp(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not r.passed and "shape mismatch" in r.message and r.report is None
    r = cmp(torch.zeros(3, dtype=torch.int32), torch.zeros(3))
    assert not r.passed and "kind" in r.message
    assert not cmp([0.0], torch.zeros(1)).passed
    # same kind, different float dtype is compared numerically
    assert cmp(torch.ones(3, dtype=torch.bfloat16), torch.ones(3)).passed


def test_allclose_nan_and_inf():
    e = torch.tensor([1.0, 2.0, math.inf])
    a = torch.tensor([1.0, math.nan, math.inf])
    r = AllClose(rtol=1.0, atol=1.0)(a, e)
    assert not r.passed and "(1,)" in r.message and "actual=nan" in r.message
    both = torch.tensor([math.nan, 1.0])
    assert not AllClose(rtol=0, atol=0)(both, both).passed
    assert AllClose(rtol=0, atol=0, equal_nan=True)(both, both).passed
    assert AllClose(rtol=0, atol=0)(e, e).passed


def test_allclose_exact_large_integers():
    e = torch.tensor([2**60], dtype=torch.int64)
    assert AllClose(0, 0)(e.clone(), e).passed
    assert not AllClose(0, 0)(e + 1, e).passed


# ------------------------------------------------------------------ RatioAllClose
def test_ratio_allclose_budget():
    e = torch.zeros(1000)
    a = e.clone()
    a[:5] = 1.0  # 0.5% outliers
    r = RatioAllClose(rtol=0, atol=1e-3, max_outlier_ratio=0.01, max_outlier_error=1.0)(a, e)
    assert r.passed and "5/1000" in r.message and "0.5000%" in r.message
    assert "max outlier error 1 (<= cap 1)" in r.message
    a[:20] = 1.0  # 2% outliers
    r = RatioAllClose(rtol=0, atol=1e-3, max_outlier_ratio=0.01, max_outlier_error=1.0)(a, e)
    assert not r.passed and "20/1000" in r.message and "2.0000%" in r.message


def test_ratio_allclose_nan_always_fails():
    e = torch.zeros(1000)
    a = e.clone()
    a[7] = math.nan
    r = RatioAllClose(rtol=0, atol=1e-3, max_outlier_ratio=0.5, max_outlier_error=math.inf)(a, e)
    assert not r.passed and "non-finite" in r.message
    with pytest.raises(ValueError):
        RatioAllClose(0, 0, 1.5, max_outlier_error=1.0)


def test_ratio_allclose_single_far_outlier_fails():
    """One wildly wrong value fails, however small the outlier fraction."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(100_000, generator=g)
    a = e + 1e-7
    cmp = RatioAllClose(rtol=2 ** -7, atol=1e-6, max_outlier_ratio=0.02, max_outlier_error=2 ** -6)
    assert cmp(a, e).passed
    a[:100] = e[:100] + 2 ** -7  # <= 0.1 % small outliers (|e| < 1): within budget and cap
    r = cmp(a, e)
    assert r.passed and "(<= cap 0.015625)" in r.message, r.message
    a[12345] = e[12345] + 1e3  # 1 far outlier: 0.001 % of the elements
    r = cmp(a, e)
    assert not r.passed
    assert "1 outlier(s) beyond the cap" in r.message and "(12345,)" in r.message
    assert "max outlier error 1000 (> cap 0.015625)" in r.message
    # the same with the cap off: only the budget counts
    assert RatioAllClose(rtol=2 ** -7, atol=1e-6, max_outlier_ratio=0.02, max_outlier_error=math.inf)(a, e).passed
    # a far outlier of the other sign, and one exactly at the cap (passes: the cap is inclusive)
    b = e.clone()
    b[3] = e[3] - 5.0
    assert not cmp(b, e).passed
    c = torch.zeros(100, dtype=torch.float64)
    d = c.clone()
    d[0] = 2 ** -6
    assert cmp(d, c).passed
    d[0] = 2 ** -6 * (1 + 2 ** -40)
    assert not cmp(d, c).passed


def test_ratio_allclose_cap_on_integers():
    """INT8 outputs: a one-step outlier is accepted, a 2-step one fails (exact integer diff)."""
    e = torch.zeros(500, dtype=torch.int8)
    a = e.clone()
    a[0] = 1
    cmp = RatioAllClose(rtol=0, atol=0, max_outlier_ratio=0.02, max_outlier_error=1)
    assert cmp(a, e).passed
    a[1] = -2
    r = cmp(a, e)
    assert not r.passed and "beyond the cap" in r.message and "(1,)" in r.message


def test_ratio_allclose_cap_required_and_validated():
    with pytest.raises(TypeError):
        RatioAllClose(0, 0, 0.1)  # the cap must be chosen at every call site
    for bad in (-1.0, math.nan, True, "1"):
        with pytest.raises(ValueError, match="max_outlier_error"):
            RatioAllClose(0, 0, 0.1, max_outlier_error=bad)
    cmp = RatioAllClose(0, 1e-3, 0.1, max_outlier_error=0.5)
    assert "max_outlier_error=0.5" in cmp.describe()


# ------------------------------------------------------------------ CosineAtLeast
def test_cosine():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(256, generator=g, dtype=torch.float64)
    assert CosineAtLeast(0.9999)(e * 3.0 + 1e-6, e).passed  # scale invariant
    # rotate by 10 degrees within the plane spanned by e and an orthogonal vector
    o = torch.randn(256, generator=g, dtype=torch.float64)
    o -= (o @ e) / (e @ e) * e
    o *= e.norm() / o.norm()
    th = math.radians(10)
    a = math.cos(th) * e + math.sin(th) * o
    r = CosineAtLeast(0.99)(a, e)
    assert not r.passed
    assert r.report.cosine == pytest.approx(math.cos(th), abs=1e-12)
    assert CosineAtLeast(0.98)(a, e).passed
    assert not CosineAtLeast(0.9)(torch.full((4,), math.nan), torch.ones(4)).passed


# ------------------------------------------------------------------ TopKTieAware
SCORES = torch.tensor([[9.0, 5.0, 5.0, 1.0, 0.0],
                       [1.0, 2.0, 3.0, 4.0, 5.0]])


def test_topk_exact_and_order_ignored():
    exp = torch.tensor([[0, 1], [4, 3]])
    act = torch.tensor([[1, 0], [3, 4]])
    r = TopKTieAware(SCORES)(act, exp)
    assert r.passed and "0 with tie swaps" in r.message


def test_topk_accepts_tie_swap():
    exp = torch.tensor([[0, 1], [4, 3]])
    act = torch.tensor([[2, 0], [4, 3]])  # score 5.0 at idx 2 ties idx 1
    r = TopKTieAware(SCORES)(act, exp)
    assert r.passed and "1 with tie swaps" in r.message


def test_topk_rejects_non_tie_swap():
    exp = torch.tensor([[0, 1], [4, 3]])
    act = torch.tensor([[0, 1], [4, 2]])  # picks score 3 instead of 4
    r = TopKTieAware(SCORES)(act, exp)
    assert not r.passed
    assert "1/2 rows" in r.message and "(1,)" in r.message and "not a tie" in r.message
    # within atol a near-tie is accepted
    assert TopKTieAware(SCORES, atol=1.0)(act, exp).passed


def test_topk_rejects_higher_and_lower_mix():
    # same threshold but a different multiset: {9,1} is not a top-2 when {9,5} exists
    exp = torch.tensor([[0, 1]])
    act = torch.tensor([[0, 3]])
    assert not TopKTieAware(SCORES[:1])(act, exp).passed


def test_topk_rejects_duplicates_and_out_of_range():
    exp = torch.tensor([[1, 2], [4, 3]])
    act = torch.tensor([[1, 1], [4, 3]])
    r = TopKTieAware(SCORES)(act, exp)
    assert not r.passed and "duplicate" in r.message
    r = TopKTieAware(SCORES)(torch.tensor([[1, 2], [4, 5]]), exp)
    assert not r.passed and "outside" in r.message


def test_topk_padding():
    scores = torch.tensor([[3.0, 2.0, 2.0, -math.inf]])
    exp = torch.tensor([[0, 1, -1]])
    assert TopKTieAware(scores)(torch.tensor([[-1, 2, 0]]), exp).passed  # tie + padding moved
    r = TopKTieAware(scores)(torch.tensor([[0, 1, 2]]), exp)  # extra valid entry
    assert not r.passed and "valid entries 3 vs expected 2" in r.message
    assert TopKTieAware(scores)(torch.tensor([[-1, -1, -1]]),
                                torch.tensor([[-1, -1, -1]])).passed


def test_topk_batched_leading_dims_and_named_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (2, 3, 16), generator=g).float()  # many ties
    exp = scores.topk(4, dim=-1).indices
    # an alternative valid selection: stable sort descending picks different tied indices
    act = torch.sort(-scores, dim=-1, stable=True).indices[..., :4].flip(-1)
    assert TopKTieAware(scores)(act, exp).passed
    unbound = TopKTieAware("scores")
    assert not unbound(act, exp).passed
    assert unbound.bind({"scores": scores})(act, exp).passed


# ------------------------------------------------------------------ error_report
def test_error_report_hand_computed():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    e = torch.tensor([1.0, 2.0, 2.0, 2.0])
    r = error_report(a, e)
    # abs err = [0, 0, 1, 2]
    assert r.numel == 4
    assert r.max_abs == 2.0
    assert r.max_rel == 1.0  # 2/2
    assert r.mean_abs == 0.75
    assert r.rel_l2 == pytest.approx(math.sqrt(5) / math.sqrt(13))
    assert r.cosine == pytest.approx(19 / (math.sqrt(30) * math.sqrt(13)))  # a.e = 1+4+6+8
    # numpy linear percentiles of [0, 0, 1, 2]
    assert r.p50 == pytest.approx(0.5)
    assert r.p90 == pytest.approx(1.7)
    assert r.p99 == pytest.approx(1.97)
    assert r.p999 == pytest.approx(1.997)
    s = str(r)
    assert "\n" not in s and "max_abs=2" in s and "rel_l2=0.620174" in s


def test_error_report_edge_cases():
    z = torch.zeros(3)
    r = error_report(z, z)
    assert (r.max_abs, r.max_rel, r.rel_l2, r.cosine) == (0.0, 0.0, 0.0, 1.0)
    r = error_report(torch.ones(3), z)
    assert r.rel_l2 == math.inf and r.cosine == 0.0 and r.max_rel == 0.0
    r = error_report(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]))
    assert r.nonfinite == 1 and math.isnan(r.max_abs) and math.isnan(r.max_rel)
    with pytest.raises(ValueError, match="shape"):
        error_report(torch.zeros(2), torch.zeros(3))
    # bf16 vs fp32 works and is computed in float64
    r = error_report(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.001]))
    assert r.max_abs == pytest.approx(np.float64(np.float32(1.001)) - 1.0)
