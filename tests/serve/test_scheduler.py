"""The continuous-batching scheduler alone, over a toy engine (next token = last + 1) and
the real SamplingParams / Sampler / StopChecker: admission order, joining and leaving
between steps, prefill steps apart from decode steps, cancellation, limits, shutdown."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from llm_kernels.serve.request import Request
from llm_kernels.serve.scheduler import ContextLengthError, QueueFullError, Scheduler
from llm_kernels.text.sampling import Sampler, SamplingParams, StopChecker

V = 64


class ToyEngine:
    """Logits one-hot at ``(last token + 1) % V``; records every step's (seq ids, token lists)."""

    def __init__(self, delay=0.0):
        self.cfg = SimpleNamespace(vocab_size=V)
        self.seqs: dict[int, int] = {}
        self.steps: list[tuple[list[int], list[list[int]]]] = []
        self.delay, self._next = delay, 0

    def add_sequence(self):
        self._next += 1
        self.seqs[self._next] = 0
        return self._next

    def release(self, sid):
        del self.seqs[sid]

    def step(self, seq_ids, tokens, logits_rows="all"):
        assert logits_rows == "last"
        time.sleep(self.delay)
        self.steps.append((list(seq_ids), [list(t) for t in tokens]))
        out = []
        for s, t in zip(seq_ids, tokens):
            self.seqs[s] += len(t)
            lg = torch.full((1, V), -10.0)
            lg[0, (t[-1] + 1) % V] = 10.0
            out.append(lg)
        return out


class _Detok:
    def add(self, t):
        return f"<{t}>"

    def finish(self):
        return ""


def _req(prompt, max_tokens, **kw):
    p = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **kw}).validate(V)
    events = []
    r = Request(prompt_ids=list(prompt), params=p, sampler=Sampler(p), detok=_Detok(), stop=StopChecker(p, ()),
                sink=events.append)
    return r, events


def _wait(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("kw,name", [({"max_batch": 0}, "max_batch"), ({"max_queue": -1}, "max_queue"),
                                     ({"max_seq_len": 1}, "max_seq_len")])
def test_bad_sizes_name_the_argument(kw, name):
    args = {"max_batch": 2, "max_queue": 2, "max_seq_len": 32, **kw}
    with pytest.raises(ValueError, match=name):
        Scheduler(ToyEngine(), **args)


def test_context_check_names_the_field():
    s = Scheduler(ToyEngine(), max_batch=1, max_queue=0, max_seq_len=10)
    s.check_fits(4, 6)
    with pytest.raises(ContextLengthError) as e:
        s.check_fits(4, 7)
    assert e.value.param == "max_tokens" and "at most 6" in str(e.value)
    with pytest.raises(ContextLengthError) as e:
        s.check_fits(10, 1, "messages")
    assert e.value.param == "messages"


def test_requests_join_and_leave_between_steps():
    eng = ToyEngine(delay=0.002)
    s = Scheduler(eng, max_batch=2, max_queue=4, max_seq_len=64)
    reqs = [_req([1, 2], 3), _req([10, 11], 6), _req([20, 21, 22], 2)]
    for r, _ in reqs:
        s.submit(r)  # submitted before the worker starts: the first two are admitted together
    s.start()
    _wait(lambda: all(r.done for r, _ in reqs))
    s.stop()
    # tokens follow the toy rule, each request exactly its budget, events end with one finish
    assert [r.generated for r, _ in reqs] == [[3, 4, 5], [12, 13, 14, 15, 16, 17], [23, 24]]
    for r, ev in reqs:
        assert [e.kind for e in ev] == ["token"] * (len(r.generated) - 1) + ["finish"]
        assert ev[-1].finish_reason == "length"
        assert "".join(e.text for e in ev) == "".join(f"<{t}>" for t in r.generated)
    # every prompt is prefilled in a step of its own; decode steps feed one token per sequence
    prefills = [st for st in eng.steps if any(len(t) > 1 for t in st[1])]
    assert len(prefills) == 3
    assert all(len(ids) == 1 for ids, _ in prefills)
    decodes = [st for st in eng.steps if st not in prefills]
    assert all(all(len(t) == 1 for t in toks) for _, toks in decodes)
    assert max(len(ids) for ids, _ in decodes) == 2  # two ran together, never more than max_batch
    # the third request joined after the first left, while the second still ran
    sid = {tuple(toks[0]): ids[0] for ids, toks in eng.steps if len(ids) == 1}
    third, second = sid[(20, 21, 22)], sid[(10, 11)]
    assert any(third in ids and second in ids for ids, _ in decodes)
    assert eng.seqs == {}  # every sequence released
    st = s.stats()
    assert st["requests_done"] == 3 and st["tokens"] == 11 and st["prefill_tokens"] == 7


def test_stop_token_ends_early_and_releases():
    eng = ToyEngine()
    s = Scheduler(eng, max_batch=2, max_queue=0, max_seq_len=64)
    r, ev = _req([5], 10, stop_token_ids=[8])
    s.start()
    s.submit(r)
    _wait(lambda: r.done)
    s.stop()
    assert r.generated == [6, 7, 8] and ev[-1].finish_reason == "stop" and eng.seqs == {}


def test_queue_full_and_cancel():
    eng = ToyEngine(delay=0.01)
    s = Scheduler(eng, max_batch=1, max_queue=1, max_seq_len=500)
    a, ev_a = _req([1], 400)
    b, ev_b = _req([2], 5)
    c, _ = _req([3], 5)
    s.start()
    s.submit(a)
    _wait(lambda: len(a.generated) > 2)
    s.submit(b)
    with pytest.raises(QueueFullError, match="--max-batch 1.*--max-queue 1"):
        s.submit(c)
    s.cancel(b)  # leaves the queue at once
    assert s.stats()["waiting"] == 0 and b.done
    s.cancel(a)  # releases its sequence before the next step
    _wait(lambda: eng.seqs == {})
    n = len(eng.steps)
    time.sleep(0.05)
    assert len(eng.steps) == n  # nothing runs any more
    assert ev_b == [] and ev_a[-1].kind == "token"  # cancelled requests get no finish event
    assert s.stats()["requests_cancelled"] == 2
    s.submit(c)  # room again
    _wait(lambda: c.done)
    s.stop()
    assert c.generated == [4, 5, 6, 7, 8]


def test_stop_fails_pending_requests_with_503():
    eng = ToyEngine(delay=0.01)
    s = Scheduler(eng, max_batch=1, max_queue=2, max_seq_len=500)
    a, ev_a = _req([1], 400)
    b, ev_b = _req([2], 5)
    s.start()
    s.submit(a)
    s.submit(b)
    _wait(lambda: len(a.generated) > 1)
    threading.Thread(target=s.stop).start()
    _wait(lambda: a.done and b.done)
    assert ev_a[-1].kind == "error" and ev_a[-1].status == 503
    assert ev_b == [type(ev_b[0])("error", status=503, message="the server is shutting down")]
    assert eng.seqs == {}
    with pytest.raises(RuntimeError, match="shutting down"):
        s.submit(_req([1], 2)[0])


@pytest.mark.parametrize("kw,fast", [({}, True), ({"repetition_penalty": 1.3}, False),
                                     ({"presence_penalty": 0.5}, False), ({"temperature": 0.8, "seed": 3}, False)])
def test_sample_fast_greedy_path_equals_the_sampler(kw, fast):
    """Plain greedy takes numpy's argmax; it picks what the Sampler picks (ties: first index)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        row = torch.randn(151936, generator=g)
        if trial % 2:  # a tie at the maximum: the first index wins
            hi = int(torch.argmax(row))
            row[(hi + 7) % row.numel()] = row[hi]
        r, _ = _req([1, 2, 3], 5, **kw)
        r.generated = [4, 5]
        ref = Sampler(r.params)  # a fresh sampler with the same seed
        assert r.sample(row) == ref.next(row, r.prompt_ids, r.generated)
    # the fast path is taken exactly when the request is plain greedy
    r, _ = _req([1], 5, **kw)
    r.sampler = None  # would raise if used
    if fast:
        assert r.sample(torch.randn(64)) >= 0
    else:
        with pytest.raises(AttributeError):
            r.sample(torch.randn(64))
