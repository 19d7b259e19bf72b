"""``sparse_attn_core_ragged``: a ragged batch of sequences, each with its own KV pool
(given as pieces) and index lists, in one call.

* fused: every row is bit-identical to a :func:`sparse_attn_core` call of its sequence alone,
  whether the sequences share one kernel call (decode-sized batch, equal widths), split by
  index width (unequal widths) or run one call each (more rows than ``ROW_INVARIANT_ROWS``);
* reference: the per-sequence loop, bitwise its own ``sparse_attn_core``; fused vs reference
  within the bounds of ``test_attn_moe.py``'s sparse-attention tests;
* bad layouts raise (ValueError), an index past its own sequence's pool raises IndexError
  even when the concatenated pool is longer.
"""

from __future__ import annotations

import pytest
import torch

from llm_kernels.kernels.deepseek_v4 import sparse_attn as KA
from llm_kernels.kernels.deepseek_v4.stage_shared import ROW_INVARIANT_ROWS
from llm_kernels.numerics.rounding import rnd
from llm_kernels.reference.deepseek_v4 import sparse_attn as RA

H, HD, RD = 8, 64, 16


def _seq(g, T, n_win, n_cmp, width, dtype):
    """One sequence: q [T, H, HD], pool pieces (window rows, new rows, entries), indices
    [T, width] with padding."""
    q = rnd(torch.randn(T, H, HD, generator=g), dtype)
    pieces = [rnd(torch.randn(n, HD, generator=g), dtype) for n in (n_win, T, n_cmp)]
    N = n_win + T + n_cmp
    idx = torch.randint(0, N, (T, width), generator=g)
    idx[torch.rand(T, width, generator=g) < 0.2] = -1
    return q, pieces, idx


def _batch(specs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [_seq(g, *s, dtype) for s in specs]
    T = sum(s[0] for s in specs)
    q = torch.cat([s[0] for s in seqs])
    cos, sin = torch.rand(T, RD // 2, generator=g), torch.rand(T, RD // 2, generator=g)
    sink = torch.randn(H, generator=g)
    return q, [s[1] for s in seqs], [s[2] for s in seqs], sink, cos, sin


def _alone(core, q, pools, idxs, sink, cos, sin, dtype):
    outs, o = [], 0
    for p, i in zip(pools, idxs):
        n = i.shape[0]
        outs.append(core(q[o:o + n], torch.cat(p), i, sink, cos[o:o + n], sin[o:o + n], softmax_scale=0.125,
                         dtype=dtype))
        o += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("specs", [
    [(1, 40, 0, 48), (1, 5, 0, 48), (1, 47, 0, 48), (1, 0, 0, 48)],     # decode, equal widths: one call
    [(2, 30, 6, 40), (1, 12, 3, 40), (3, 20, 9, 40)],                  # verify-sized rows, equal widths
    [(1, 40, 7, 56), (1, 5, 2, 50), (1, 47, 9, 56), (2, 8, 1, 50)],    # two widths (HCA-like): two calls
    [(40, 60, 5, 48), (30, 10, 2, 48)],                                 # > ROW_INVARIANT_ROWS: per sequence
])
def test_fused_ragged_is_each_sequence_alone(specs, dtype):
    args = _batch(specs, dtype)
    assert (sum(s[0] for s in specs) > ROW_INVARIANT_ROWS) == (specs[0][0] == 40)
    got = KA.sparse_attn_core_ragged(*args, softmax_scale=0.125, dtype=dtype)
    want = _alone(KA.sparse_attn_core, *args, dtype)
    assert got.shape == want.shape and torch.equal(got, want)
    ref = RA.sparse_attn_core_ragged(*args, softmax_scale=0.125, dtype=dtype)
    assert torch.equal(ref, _alone(RA.sparse_attn_core, *args, dtype))
    # fused vs reference, the bounds of test_attn_moe's sparse-attention tests: float32
    # rtol 1e-5 / atol 1e-6 (GEMM summation order); bf16 one bf16 step (2^-8) of the output's
    # scale (a score or output element may round the other way)
    if dtype == torch.float32:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    else:
        assert (got - ref).abs().max() <= 2 ** -8 * ref.abs().max()


@pytest.mark.parametrize("mod", [KA, RA], ids=["fused", "reference"])
def test_ragged_errors(mod):
    q, pools, idxs, sink, cos, sin = _batch([(1, 10, 0, 12), (1, 30, 0, 12)], torch.float32)
    kw = dict(softmax_scale=0.125, dtype=torch.float32)
    with pytest.raises(ValueError, match="one entry per sequence"):
        mod.sparse_attn_core_ragged(q, pools, idxs[:1], sink, cos, sin, **kw)
    with pytest.raises(ValueError, match="sum to 3 but q has 2 rows"):
        mod.sparse_attn_core_ragged(q, pools, [idxs[0], torch.zeros(2, 12, dtype=torch.long)], sink, cos, sin, **kw)
    bad = idxs[0].clone()
    bad[0, 0] = 11  # past sequence 0's pool of 11 rows, inside the 42 rows of both pools
    with pytest.raises(IndexError, match="11"):
        mod.sparse_attn_core_ragged(q, pools, [bad, idxs[1]], sink, cos, sin, **kw)


def test_fused_pool_needs_a_piece():
    q, pools, idxs, sink, cos, sin = _batch([(1, 10, 0, 12), (1, 30, 0, 12)], torch.float32)
    with pytest.raises(ValueError, match="at least one piece"):
        KA.sparse_attn_core_ragged(q, [[], pools[1]], idxs, sink, cos, sin, softmax_scale=0.125,
                                   dtype=torch.float32)
