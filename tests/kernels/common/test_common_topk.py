"""Stable top-k with -inf masking vs torch.topk (tie-aware) and vs an exact stable sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_kernels.harness import GoldenCase, TensorSpec, TopKTieAware, run_case
from llm_kernels.kernels.common.topk import topk_indices


def torch_topk_masked(s: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk, -inf picks -> -1, padded with -1 to k columns."""
    n = s.shape[-1]
    kk = min(k, n)
    v, i = torch.topk(s, kk, dim=-1)
    i = torch.where(v == float("-inf"), torch.full_like(i, -1), i)
    if k > n:
        i = torch.cat([i, torch.full((*i.shape[:-1], k - n), -1, dtype=i.dtype)], -1)
    return i


def stable_ref(s: torch.Tensor, k: int) -> torch.Tensor:
    """Exact expected order: valid entries by (score desc, index asc)."""
    s2 = s.reshape(-1, s.shape[-1])
    out = torch.full((s2.shape[0], k), -1, dtype=torch.int64)
    for r in range(s2.shape[0]):
        row = s2[r]
        idx = torch.nonzero((row != float("-inf")) & ~torch.isnan(row)).flatten()
        sel = idx[torch.argsort(-row[idx].double(), stable=True)][:k]
        out[r, :sel.numel()] = sel
    return out.reshape(*s.shape[:-1], k)


def _masked_ties(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    s = torch.randint(0, 6, shape, generator=g).to(dtype)  # many exact ties
    s2 = s.view(-1, shape[-1])
    s2[0] = float("-inf")                                   # fully masked row
    if s2.shape[0] > 1:
        s2[1, ::3] = float("-inf")                          # partially masked
    if s2.shape[0] > 2:
        s2[2, : shape[-1] - 3] = float("-inf")              # fewer valid than k
    return s


@pytest.mark.parametrize("R,N,k", [(24, 20, 8), (6, 16384, 512), (3, 1000, 1000), (5, 50, 64),
                                   (4, 3000, 1), (3, 7, 0)])
def test_topk_vs_torch_tie_aware(R, N, k):
    case = GoldenCase(
        name=f"topk/R{R}_N{N}_k{k}",
        inputs=[TensorSpec("scores", (R, N), torch.float32, _masked_ties),
                TensorSpec("idx", (R, k), torch.int64, is_output=True)],
        golden=lambda v: {"idx": torch_topk_masked(v["scores"], k)},
        impl=lambda v: {"idx": topk_indices(v["scores"], k)},
        comparators={"idx": TopKTieAware("scores")})
    res = run_case(case)
    assert res.passed, res.outputs
    s = _masked_ties((R, N), torch.float32)
    assert torch.equal(topk_indices(s, k), stable_ref(s, k))  # and the exact stable order


def test_topk_random_floats_signs_and_nan():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 777, generator=g) * 1e3
    s[0, :5] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -1e-45])
    s[1] = -s[1].abs()  # all negative
    out = topk_indices(s, 100)
    assert torch.equal(out, stable_ref(s, 100))
    assert not (out[0] == 3).any()  # NaN never selected
    res = TopKTieAware(torch.nan_to_num(s, nan=float("-inf")))(out, torch_topk_masked(
        torch.nan_to_num(s, nan=float("-inf")), 100))
    assert res.passed, res.message


def test_topk_layouts_and_errors():
    s = _masked_ties((2, 3, 40), torch.float32)
    out = topk_indices(s, 5)
    assert out.shape == (2, 3, 5) and out.dtype == torch.int64
    assert torch.equal(out, stable_ref(s, 5))
    on = topk_indices(s.numpy(), 5)
    assert isinstance(on, np.ndarray) and (on == out.numpy()).all()
    ob = topk_indices(s.to(torch.bfloat16), 5)  # small ints are exact in bf16
    assert torch.equal(ob, out)
    assert (topk_indices(np.zeros((2, 0), np.float32), 3) == -1).all()
    with pytest.raises(ValueError):
        topk_indices(s, -1)
    with pytest.raises(TypeError):
        topk_indices(s.double().numpy(), 2)


def test_topk_rows_deterministic():
    s = torch.randint(0, 3, (64, 2048), generator=torch.Generator().manual_seed(0)).float()
    a = topk_indices(s, 128)
    for _ in range(3):
        assert torch.equal(topk_indices(s, 128), a)
