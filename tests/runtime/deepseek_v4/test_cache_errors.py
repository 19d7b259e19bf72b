"""Error handling of the cached runtime (``DeepSeekV4Engine`` / ``runtime.cache``):
capacity overflow, bad token ids, unknown sequences, empty or malformed steps. Every error
must leave all caches as they were: the test then takes a valid step and checks its logits
against the stateless reference ``model.forward`` on the whole sequence (fp32 bound of
``helpers``), which fails if any window row, compressor buffer or entry was touched.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_close_fp32, token_ids
from llm_kernels.reference.deepseek_v4 import model
from llm_kernels.errors import CacheOverflowError
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine

NAME = "mini"
CAP = 136  # room for one ratio-128 entry; 136 = 34 ratio-4 windows


@pytest.fixture(scope="module")
def setup(zoo):
    cfg, w = zoo.ours(NAME, torch.float32)
    ids = token_ids(cfg, CAP, seed=31)
    ref = model.forward(w, cfg, ids, dtype=torch.float32)  # logits of every prefix
    return cfg, w, ids, ref


def _engine(setup, cap=CAP):
    cfg, w, _, _ = setup
    return DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=cap)


def _snapshot(eng):
    """Deep copy of every sequence's cache (tensors cloned) for before/after comparison."""
    return {sid: copy.deepcopy(c) for sid, c in eng.seqs.items()}


def _assert_unchanged(eng, snap, same_sequences=True):
    """Every snapshotted sequence is bit-for-bit as before (and, with ``same_sequences``,
    no sequence was added or removed)."""
    if same_sequences:
        assert set(eng.seqs) == set(snap), f"sequences changed: {sorted(snap)} -> {sorted(eng.seqs)}"
    for sid, before in snap.items():
        after = eng.seqs[sid]
        assert after.length == before.length and after.token_ids == before.token_ids
        for li, (a, b) in enumerate(zip(after.layers, before.layers)):
            assert a.window.end == b.window.end and torch.equal(a.window.rows, b.window.rows), f"layer {li} window"
            for st_a, st_b in ((a.compressor, b.compressor), (a.indexer, b.indexer)):
                if st_b is None:
                    assert st_a is None
                    continue
                assert st_a.n_entries == st_b.n_entries, f"layer {li} entries"
                assert torch.equal(st_a.entries, st_b.entries) and torch.equal(st_a.buf_kv, st_b.buf_kv)
                assert torch.equal(st_a.buf_score, st_b.buf_score)
                assert (st_a.prev_kv is None) == (st_b.prev_kv is None)
                if st_b.prev_kv is not None:
                    assert torch.equal(st_a.prev_kv, st_b.prev_kv)


def _check_next_step(setup, eng, sid, n=1):
    """A valid step of ``n`` tokens on ``sid`` still matches the reference rows."""
    _, _, ids, ref = setup
    L = eng.seqs[sid].length
    (out,) = eng.step([sid], [ids[L:L + n].tolist()])
    assert_close_fp32(out, ref[L:L + n], f"step at position {L} after an error")


# ============================================================ capacity
def test_prefill_longer_than_max_seq_len_raises(setup):
    cfg, _, ids, ref = setup
    eng = _engine(setup)
    (sid,), _ = eng.prefill([ids[:5].tolist()])
    snap = _snapshot(eng)
    too_long = token_ids(cfg, CAP + 1, seed=32).tolist()
    with pytest.raises(CacheOverflowError):
        eng.prefill([too_long])
    _assert_unchanged(eng, snap, same_sequences=False)  # the existing sequence is untouched
    # (that no half-created sequence is left behind: test_failed_prefill_leaves_no_orphan_sequence)
    _check_next_step(setup, eng, sid, n=3)
    # exactly max_seq_len tokens is fine
    (_,), (full,) = eng.prefill([ids.tolist()])
    assert_close_fp32(full, ref, "prefill of exactly max_seq_len tokens")


def test_failed_prefill_leaves_no_orphan_sequence(setup):
    """A prefill that raises (overflow, bad id, empty prompt) must not leave half-created
    sequences behind: the caller never learns their ids, so it cannot ``release`` them, and
    each one holds caches sized for ``max_seq_len`` (the compressor entry buffers are
    allocated up front). ``step`` promises "on error no cache is modified"; ``prefill``
    should not register sequences for a call that fails."""
    cfg, _, ids, _ = setup
    eng = _engine(setup)
    (keep,), _ = eng.prefill([ids[:6].tolist()])
    for bad in ([list(range(CAP + 1))], [[cfg.vocab_size]], [[]], [ids[:4].tolist(), [-1]]):
        before = sorted(eng.seqs)
        with pytest.raises((CacheOverflowError, ValueError)):
            eng.prefill(bad)
        assert sorted(eng.seqs) == before, (
            f"failed prefill of prompts with {[len(p) for p in bad]} tokens left orphan sequences "
            f"{sorted(set(eng.seqs) - set(before))} registered in the engine")
    assert eng.seqs[keep].length == 6


def test_decode_past_capacity_raises_and_keeps_cache(setup):
    _, _, ids, ref = setup
    eng = _engine(setup)
    (sid,), _ = eng.prefill([ids[:CAP - 3].tolist()])
    snap = _snapshot(eng)
    with pytest.raises(CacheOverflowError):
        eng.decode([sid], [ids[CAP - 3:CAP].tolist() + [0]])  # 4 tokens, 3 fit
    _assert_unchanged(eng, snap)
    _check_next_step(setup, eng, sid, n=2)  # positions CAP-3, CAP-2
    _check_next_step(setup, eng, sid, n=1)  # position CAP-1: the cache is now full
    assert eng.seqs[sid].length == CAP
    snap = _snapshot(eng)
    for _ in range(2):  # repeated attempts keep failing and keep the state
        with pytest.raises(CacheOverflowError):
            eng.decode([sid], [0])
    _assert_unchanged(eng, snap)


def test_overflow_in_a_batch_leaves_every_sequence_unchanged(setup):
    """A step over two sequences where only one overflows is rejected as a whole."""
    _, _, ids, _ = setup
    eng = _engine(setup)
    (full, other), _ = eng.prefill([ids[:CAP].tolist(), ids[:50].tolist()])
    snap = _snapshot(eng)
    with pytest.raises(CacheOverflowError):
        eng.step([other, full], [ids[50:52].tolist(), [1]])
    _assert_unchanged(eng, snap)
    _check_next_step(setup, eng, other, n=2)


def test_max_seq_len_validation(setup):
    cfg, w, _, _ = setup
    with pytest.raises(ValueError):
        DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=0)
    with pytest.raises(ValueError):
        DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError):
        DeepSeekV4Engine(w, cfg, torch.float16, max_seq_len=16)


# ============================================================ bad inputs
@pytest.mark.parametrize("bad", ["vocab", "huge", "negative"])
def test_out_of_vocab_ids_raise_value_error(setup, bad):
    cfg, _, ids, _ = setup
    bad_id = {"vocab": cfg.vocab_size, "huge": 10 ** 9, "negative": -1}[bad]
    eng = _engine(setup)
    (sid, other), _ = eng.prefill([ids[:20].tolist(), ids[:7].tolist()])
    snap = _snapshot(eng)
    with pytest.raises(ValueError):
        eng.decode([sid], [bad_id])
    with pytest.raises(ValueError):
        eng.step([sid], [[int(ids[20]), bad_id, int(ids[21])]])  # bad id mid-chunk
    with pytest.raises(ValueError):
        eng.step([other, sid], [ids[7:9].tolist(), [bad_id]])  # only one sequence is bad
    with pytest.raises(ValueError):
        eng.step([sid], [[bad_id]])
    _assert_unchanged(eng, snap)
    _check_next_step(setup, eng, sid, n=2)
    _check_next_step(setup, eng, other, n=1)


def test_unknown_sequence_id_raises_key_error(setup):
    _, _, ids, _ = setup
    eng = _engine(setup)
    (sid,), _ = eng.prefill([ids[:9].tolist()])
    snap = _snapshot(eng)
    with pytest.raises(KeyError):
        eng.decode([sid + 1000], [1])
    with pytest.raises(KeyError):
        eng.step([sid, sid + 1], [[1], [2]])  # one known, one unknown
    _assert_unchanged(eng, snap)
    _check_next_step(setup, eng, sid)
    eng.release(sid)
    with pytest.raises(KeyError):
        eng.decode([sid], [1])
    with pytest.raises(KeyError):
        eng.release(sid)


def test_empty_or_malformed_steps_raise(setup):
    _, _, ids, _ = setup
    eng = _engine(setup)
    (sid, other), _ = eng.prefill([ids[:11].tolist(), ids[:3].tolist()])
    snap = _snapshot(eng)
    with pytest.raises(ValueError):
        eng.decode([sid], [[]])                      # empty token list
    with pytest.raises(ValueError):
        eng.step([sid], [[]])
    with pytest.raises(ValueError):
        eng.step([other, sid], [[1], []])            # one sequence empty
    with pytest.raises(ValueError):
        eng.step([sid, sid], [[1], [2]])             # a sequence twice in one step
    with pytest.raises(ValueError):
        eng.step([sid], [[1], [2]])                  # ids / token lists length mismatch
    _assert_unchanged(eng, snap)
    _check_next_step(setup, eng, sid, n=2)
