"""The fused gate's hash routing: ``tid2eid[id]`` is read and range-checked inside the
gate kernel (bad ids and bad table rows raise IndexError naming them)."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.kernels.deepseek_v4 import moe as KM
from llm_kernels.numerics.rounding import rnd

BF16 = torch.bfloat16


@pytest.mark.parametrize("table_dtype", [torch.int64, torch.int32])
def test_gate_hash_table_errors(table_dtype):
    """Hash routing reads ``tid2eid[id]`` inside the kernel: an id outside the table and a
    table row naming an expert outside [0, E) raise IndexError naming the id; an int32
    table routes like the int64 one."""
    D, E, K, V = 64, 8, 2, 10
    g = torch.Generator().manual_seed(7)
    x = rnd(torch.randn(3, D, generator=g), BF16)
    gate_w = torch.randn(E, D, generator=g).bfloat16()
    table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]).to(table_dtype)
    kw = dict(top_k=K, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, dtype=BF16)
    ids = torch.tensor([1, 9, 4])
    w, i = KM.gate(x, gate_w, None, table, ids, **kw)
    assert torch.equal(i, table[ids].long())
    w64, i64 = KM.gate(x, gate_w, None, table.long(), ids, **kw)
    assert torch.equal(w, w64) and torch.equal(i, i64)
    with pytest.raises(IndexError, match=r"input_ids\[1\] = 10 is outside the tid2eid table"):
        KM.gate(x, gate_w, None, table, torch.tensor([1, 10, 4]), **kw)
    bad = table.clone()
    bad[4, 1] = E
    with pytest.raises(IndexError, match=r"expert id outside \[0, 8\) \(row of token id 4\)"):
        KM.gate(x, gate_w, None, bad, ids, **kw)
    with pytest.raises(ValueError, match="tid2eid must be an integer table"):
        KM.gate(x, gate_w, None, table[:, :1], ids, **kw)
