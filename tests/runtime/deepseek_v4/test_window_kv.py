"""``WindowKV`` (a view into a growing buffer) against the plain definition: the newest
``size`` rows of everything appended; every snapshot keeps its rows while later appends,
restores and other snapshots happen (speculative decoding's rewind relies on it)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_kernels.runtime.deepseek_v4.cache import WindowKV

_OPS = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(0, 12)),
                          st.tuples(st.just("snapshot"), st.just(0)),
                          st.tuples(st.just("restore"), st.integers(0, 50))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 9), ops=_OPS)
def test_window_is_the_newest_rows_and_snapshots_hold(size, ops):
    g = torch.Generator().manual_seed(size)
    w, ref, end, snaps = WindowKV(size, 3), torch.zeros(0, 3), 0, []
    for op, n in ops:
        if op == "append":
            kv = torch.randn(n, 3, generator=g)
            w.append(kv)
            ref, end = torch.cat([ref, kv])[-size:] if n + ref.shape[0] else ref, end + n
        elif op == "snapshot":
            snaps.append((w.snapshot(), ref.clone(), end))
        elif snaps:
            snap, ref, end = snaps[n % len(snaps)]
            w.restore(snap)
        assert w.end == end and w.start == end - ref.shape[0] and torch.equal(w.rows, ref)
        for snap, rows, _ in snaps:
            assert torch.equal(snap[0], rows)


def test_window_rows_assignment_and_bad_rows():
    w = WindowKV(4, 2)
    w.append(torch.ones(3, 2))
    w.rows = torch.full((2, 2), 5.0)  # as the layer benchmark loads a window
    w.append(torch.zeros(3, 2))
    assert torch.equal(w.rows, torch.tensor([[5.0, 5.0], [0, 0], [0, 0], [0, 0]])) and w.end == 6
    with pytest.raises(ValueError, match="window KV rows must have 2 lanes"):
        w.append(torch.zeros(1, 3))
