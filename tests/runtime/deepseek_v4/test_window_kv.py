"""``WindowKV`` (a view into a growing buffer) against the plain definition: the newest
``size`` rows of everything appended; every snapshot keeps its rows while later appends,
restores and other snapshots happen (speculative decoding's rewind relies on it). The same
for ``CompressorState``'s open window (rows written past a buffer's valid rows)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_kernels.runtime.deepseek_v4.cache import CompressorState, WindowKV

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


@settings(max_examples=300, deadline=None)
@given(ratio=st.sampled_from([1, 2, 4, 5]), overlap=st.booleans(), ops=_OPS)
def test_compressor_open_window_and_snapshots_hold(ratio, overlap, ops):
    """absorb() against the plain definition (closed windows = consecutive groups of
    ``ratio`` rows of everything absorbed, the rest open; overlap: each window's front
    halves come with the previous window's), while snapshots / restores interleave."""
    d = 2
    w = 2 * d if overlap else d
    g = torch.Generator().manual_seed(ratio)
    cs = CompressorState(ratio, d, overlap, capacity=1000)
    rows_kv, rows_sc, snaps = torch.zeros(0, w), torch.zeros(0, w), []
    for op, n in ops:
        if op == "append":
            kv, sc = torch.randn(n, w, generator=g), torch.randn(n, w, generator=g)
            done = rows_kv.shape[0] // ratio
            kvw, sw, pk, ps, m = cs.absorb(kv, sc)
            rows_kv, rows_sc = torch.cat([rows_kv, kv]), torch.cat([rows_sc, sc])
            assert m == rows_kv.shape[0] // ratio - done
            if m:
                want = rows_kv[done * ratio:(done + m) * ratio].view(m, ratio, w)
                assert torch.equal(kvw, want) and torch.equal(sw, rows_sc[done * ratio:(done + m) * ratio].view(m, ratio, w))
                if overlap:
                    prev = [rows_kv[(j - 1) * ratio:j * ratio, :d] if j else torch.zeros(ratio, d)
                            for j in range(done, done + m)]
                    assert torch.equal(pk, torch.stack(prev))
                cs.reclaim(m)
        elif op == "snapshot":
            snaps.append((cs.snapshot(), rows_kv.clone(), rows_sc.clone()))
        elif snaps:
            snap, rows_kv, rows_sc = snaps[n % len(snaps)]
            rows_kv, rows_sc = rows_kv.clone(), rows_sc.clone()
            cs.restore(snap)
        k = rows_kv.shape[0] - rows_kv.shape[0] // ratio * ratio
        assert torch.equal(cs.buf_kv, rows_kv[rows_kv.shape[0] - k:]) and torch.equal(cs.buf_score, rows_sc[rows_sc.shape[0] - k:])
        assert cs.n_entries == rows_kv.shape[0] // ratio
        for snap, rk, rs in snaps:
            kk = rk.shape[0] - rk.shape[0] // ratio * ratio
            assert torch.equal(snap[0], rk[rk.shape[0] - kk:]) and torch.equal(snap[1], rs[rs.shape[0] - kk:])
