"""The shared engine core behaves the same for every registered model: validation errors,
logits-row selection, rollback of a failed step, sequence bookkeeping.

(Before the core existed the two engines drifted: a bad ``logits_rows`` raised in one and
was read as "all" in the other.)"""

from __future__ import annotations

import pytest
import torch

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.errors import CacheOverflowError

PRESETS = {"deepseek_v4": ("mini", 2), "qwen3": ("qwen3-mini", 2)}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def engine_factory(request, tmp_path_factory):
    name, layers = PRESETS[request.param]
    out = tmp_path_factory.mktemp(name)
    write_random_checkpoint(models.preset(name, num_hidden_layers=layers), out, seed=3, dtype=torch.float32,
                            progress=False)
    cfg, w = load_checkpoint(out, dtype=torch.float32, progress=False)
    spec = models.spec_for_config(cfg)
    assert spec.model_type == request.param

    def make(max_seq_len=32, backend="reference"):
        return spec.make_engine(w, cfg, dtype=torch.float32, max_seq_len=max_seq_len, backend=backend, max_batch=2)

    return make, cfg


def test_logits_rows_last_equals_last_row_of_all(engine_factory):
    make, cfg = engine_factory
    a, b = make(), make()
    _, full = a.prefill([[1, 2, 3, 4], [5, 6]])
    sids = [b.add_sequence(), b.add_sequence()]
    last = b.step(sids, [[1, 2, 3, 4], [5, 6]], logits_rows="last")
    assert [t.shape for t in full] == [(4, cfg.vocab_size), (2, cfg.vocab_size)]
    assert [t.shape for t in last] == [(1, cfg.vocab_size), (1, cfg.vocab_size)]
    for f, l in zip(full, last):
        torch.testing.assert_close(l[0], f[-1], rtol=0, atol=1e-5)
    assert b.length(sids[0]) == 4 and b.length(sids[1]) == 2


@pytest.mark.parametrize("bad, err, match", [
    (dict(logits_rows="first"), ValueError, "logits_rows"),
    (dict(tokens=[[1], [2]]), ValueError, "token lists"),
    (dict(seq_ids="dup"), ValueError, "once per step"),
    (dict(tokens=[[]]), ValueError, "empty token list"),
    (dict(tokens=[[10 ** 9]]), ValueError, "token ids must be in"),
    (dict(tokens=[[-1]]), ValueError, "token ids must be in"),
    (dict(seq_ids="unknown"), KeyError, "unknown sequence id"),
])
def test_step_errors_leave_the_sequence_unchanged(engine_factory, bad, err, match):
    make, _ = engine_factory
    eng = make()
    (sid,), (before,) = eng.prefill([[1, 2, 3]])
    seq_ids = {"dup": [sid, sid], "unknown": [sid + 99]}.get(bad.get("seq_ids"), [sid])
    tokens = bad.get("tokens", [[4]] * len(seq_ids))
    with pytest.raises(err, match=match):
        eng.step(seq_ids, tokens, logits_rows=bad.get("logits_rows", "all"))
    assert eng.length(sid) == 3
    # the sequence still decodes exactly as a fresh one would
    ref = make()
    (rsid,), _ = ref.prefill([[1, 2, 3]])
    torch.testing.assert_close(eng.decode([sid], [4])[0], ref.decode([rsid], [4])[0], rtol=0, atol=0)


def test_overflow_is_checked_before_any_write(engine_factory):
    make, _ = engine_factory
    eng = make(max_seq_len=8)
    (sid,), _ = eng.prefill([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(CacheOverflowError):
        eng.decode([sid], [[7, 8, 9]])
    assert eng.length(sid) == 6
    eng.decode([sid], [[7, 8]])
    assert eng.length(sid) == 8


def test_failed_prefill_registers_nothing(engine_factory):
    make, _ = engine_factory
    eng = make()
    with pytest.raises(ValueError):
        eng.prefill([[1, 2], [3, 10 ** 9]])
    (sid,), _ = eng.prefill([[1, 2]])
    eng.release(sid)
    with pytest.raises(KeyError):
        eng.length(sid)
