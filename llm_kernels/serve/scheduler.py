"""Continuous batching over one engine: a worker thread owns the engine and runs the loop

1. release every cancelled request's sequence (a disconnected client frees its cache at
   the next step boundary, i.e. within one step);
2. admit waiting requests while fewer than ``max_batch`` run (each gets a new sequence);
3. each newly admitted request's prompt is prefilled in a step of its own (its first
   token; a prompt longer than the engine's ``prefill_chunk`` runs as successive steps of
   at most that many rows inside that ``step`` call, so its activations stay one chunk's),
   then one decode step feeds every running request the token it sampled last
   (``logits_rows="last"``: the head reads one row per sequence). Prefills stay out of the
   decode step on purpose: a step's row count picks the kernel path of float (bf16)
   weights (bf16 GEMV up to 16 rows, oneDNN above, within 1 bf16 ulp of each other), so
   keeping decode steps at <= ``max_batch`` rows and each prompt alone makes every
   greedy stream's tokens the same as the request run alone, whatever else runs (INT8
   weights are bitwise row-independent anyway). The cost is one extra weight pass per
   admitted request;
4. per request: sample, detokenize incrementally, check stops; a finished request releases
   its sequence at once; the events of the decode step go out in one hand-off (a
   prefill's first token right after that prefill).

Capacity: ``max_batch`` sequences run, each within ``max_seq_len`` tokens (prompt +
``max_tokens`` is checked at submission, see :meth:`Scheduler.check_fits`), which is what
the engine's cache was sized for; at most ``max_queue`` more wait. Beyond that
:meth:`Scheduler.submit` raises :class:`QueueFullError` (the server's 503).

Failures: if a batched step raises, each of its requests is retried alone (``EngineCore.step``
changes no sequence on error), so only the request that fails alone gets an ``error`` event;
a failing sampler / detokenizer fails only its request. The loop itself never dies on a
request.

Timing counters (:meth:`Scheduler.stats`): engine seconds inside ``step``, the loop's
seconds around it (sampling, detokenization, hand-off: the server's own overhead per
step), steps, tokens, requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from .request import Event, Request

__all__ = ["Scheduler", "QueueFullError", "ContextLengthError"]

log = logging.getLogger("llm_kernels.serve")


class QueueFullError(RuntimeError):
    """The scheduler runs ``max_batch`` requests and ``max_queue`` more wait (HTTP 503)."""


class ContextLengthError(ValueError):
    """Prompt + ``max_tokens`` exceed ``max_seq_len`` (HTTP 400). ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Scheduler:
    """Continuous batching of :class:`Request` s over ``engine`` (see the module docstring).

    Args:
        engine: an ``EngineCore`` (``add_sequence``, ``release``, ``step``), owned by the
            worker thread from :meth:`start` on.
        max_batch: running sequences at most (the engine's cache must hold that many of
            ``max_seq_len`` tokens).
        max_queue: requests waiting for a slot at most.
        max_seq_len: tokens per sequence (prompt + generated).
        deliver: optional ``deliver(list[(Request, Event)])`` called once per step with
            all its events (e.g. one ``loop.call_soon_threadsafe``); default: each
            request's own ``sink``.

    Raises ValueError naming the argument for a non-positive size."""

    def __init__(self, engine: Any, max_batch: int, max_queue: int, max_seq_len: int,
                 deliver: Callable[[list[tuple[Request, Event]]], None] | None = None):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                            ("max_seq_len", max_seq_len, 2)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.engine, self.max_batch, self.max_queue, self.max_seq_len = engine, max_batch, max_queue, max_seq_len
        self._deliver = deliver or _deliver_to_sinks
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counters = {"steps": 0, "engine_s": 0.0, "loop_s": 0.0, "tokens": 0, "prefill_tokens": 0,
                          "requests_done": 0, "requests_failed": 0, "requests_cancelled": 0,
                          "rejected_full": 0, "batch_sum": 0, "decode_steps": 0, "decode_engine_s": 0.0,
                          "decode_rows": 0}

    # ------------------------------------------------------------------ client side
    def check_fits(self, prompt_len: int, max_tokens: int, prompt_field: str = "prompt") -> None:
        """Raise :class:`ContextLengthError` when ``prompt_len + max_tokens`` exceeds
        ``max_seq_len`` (naming ``prompt_field`` when the prompt alone does not fit)."""
        if prompt_len >= self.max_seq_len:
            raise ContextLengthError(
                f"{prompt_field}: the prompt has {prompt_len} tokens but this server's maximum context "
                f"length is {self.max_seq_len} tokens (--max-seq-len), which must leave room for at least "
                "one generated token", prompt_field)
        if prompt_len + max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"max_tokens: the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, "
                f"{prompt_len + max_tokens} in all, but this server's maximum context length is "
                f"{self.max_seq_len} tokens (--max-seq-len); ask for at most "
                f"{self.max_seq_len - prompt_len} tokens", "max_tokens")

    def submit(self, req: Request) -> None:
        """Queue ``req`` for the next step. Raises :class:`QueueFullError` with the reason when
        ``max_batch`` run and ``max_queue`` already wait, RuntimeError when stopped."""
        self.check_fits(len(req.prompt_ids), req.max_tokens)
        with self._cond:
            if self._stop:
                raise RuntimeError("the scheduler is shutting down")
            if len(self._running) + len(self._waiting) >= self.max_batch + self.max_queue:
                self._counters["rejected_full"] += 1
                raise QueueFullError(
                    f"server busy: {len(self._running)} requests running (--max-batch {self.max_batch}) and "
                    f"{len(self._waiting)} waiting (--max-queue {self.max_queue}); retry later")
            self._waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Cancel ``req`` (client gone): it leaves the queue at once, or releases its
        sequence before the next step. No event is sent. Safe from any thread."""
        with self._cond:
            if req.done:
                return
            req.cancelled = True
            try:
                self._waiting.remove(req)
                req.done = True
                self._counters["requests_cancelled"] += 1
            except ValueError:
                pass
            self._cond.notify()

    def stats(self) -> dict:
        """Counters and the current load (running, waiting, capacity)."""
        with self._cond:
            out = dict(self._counters)
            out.update(running=len(self._running), waiting=len(self._waiting), max_batch=self.max_batch,
                       max_queue=self.max_queue, max_seq_len=self.max_seq_len,
                       alive=self._thread is not None and self._thread.is_alive())
        return out

    # ------------------------------------------------------------------ worker
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-kernels-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker after its current step; waiting and running requests get an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                while self._waiting and len(self._running) < self.max_batch:
                    req = self._waiting.popleft()
                    req.t_admit = time.perf_counter()
                    self._running.append(req)
                batch = list(self._running)
            if not batch:
                continue
            try:
                self._iterate(batch)
            except Exception as e:  # a bug in the loop itself: fail this batch, keep serving
                log.exception("scheduler iteration failed")
                self._finish_with_error(batch, 500, f"internal error: {type(e).__name__}: {e}")
        with self._cond:
            pending = list(self._running) + list(self._waiting)
            self._waiting.clear()
        self._finish_with_error(pending, 503, "the server is shutting down")

    def _drop_cancelled(self) -> None:
        """(Lock held.) Release the sequences of cancelled running requests."""
        keep = []
        for r in self._running:
            if r.cancelled:
                self._release(r)
                r.done = True
                self._counters["requests_cancelled"] += 1
            else:
                keep.append(r)
        self._running = keep

    def _release(self, r: Request) -> None:
        if r.sid is not None:
            try:
                self.engine.release(r.sid)
            except KeyError:
                pass
            r.sid = None

    def _iterate(self, batch: list[Request]) -> None:
        """One loop iteration: prefill each newly admitted request alone (its first token
        goes out right away, not after the other prefills), then one decode step for every
        running request."""
        t0 = time.perf_counter()
        it = _Iteration()
        for r in batch:
            if r.sid is None:  # admitted this iteration
                r.sid = self.engine.add_sequence()
                self._step_and_sample([r], it)
                self._send(it.events)
                it.events = []
        self._step_and_sample([r for r in batch if not r.done], it, decode=True)
        with self._cond:
            gone = it.finished + [r for r, _ in it.failed]
            for r in gone:
                self._release(r)
            ids = set(map(id, gone))
            self._running = [r for r in self._running if id(r) not in ids]
            c = self._counters
            c["steps"] += it.steps
            c["batch_sum"] += it.rows
            c["tokens"] += it.tokens
            c["prefill_tokens"] += it.prefill_tokens
            c["requests_done"] += len(it.finished)
            c["requests_failed"] += len(it.failed)
            c["decode_steps"] += it.decode_steps
            c["decode_rows"] += it.decode_rows
            c["decode_engine_s"] += it.decode_engine_s
        self._send(it.events + [(r, Event("error", status=500, message=msg)) for r, msg in it.failed])
        t1 = time.perf_counter()
        with self._cond:
            self._counters["engine_s"] += it.engine_s
            self._counters["loop_s"] += (t1 - t0) - it.engine_s

    def _send(self, events: list[tuple[Request, Event]]) -> None:
        events = [(r, ev) for r, ev in events if not r.cancelled]  # nobody listens to a cancelled one
        if events:
            self._deliver(events)

    def _step_and_sample(self, reqs: list[Request], it: "_Iteration", decode: bool = False) -> None:
        """One engine step over ``reqs`` (each feeds :meth:`Request.next_input`), then sample
        and detokenize each. If the batched step raises, each request is retried alone (the
        failed step changed no sequence); a request that fails alone, or whose sampler /
        detokenizer raises, is marked done and listed in ``it.failed``."""
        if not reqs:
            return
        inputs = [r.next_input() for r in reqs]
        te0 = time.perf_counter()
        try:
            rows = list(zip(reqs, self.engine.step([r.sid for r in reqs], inputs, logits_rows="last")))
            it.steps += 1
        except Exception as e:
            rows = []
            if len(reqs) == 1:
                it.fail(reqs[0], e)
            else:
                for r, toks in zip(reqs, inputs):
                    try:
                        (lg,) = self.engine.step([r.sid], [toks], logits_rows="last")
                        rows.append((r, lg))
                        it.steps += 1
                    except Exception as e1:
                        it.fail(r, e1)
        dt = time.perf_counter() - te0
        it.engine_s += dt
        if decode and rows:
            it.decode_steps, it.decode_rows, it.decode_engine_s = it.decode_steps + 1, it.decode_rows + len(rows), dt
        it.rows += len(rows)
        it.prefill_tokens += sum(len(t) for r, t in zip(reqs, inputs) if not r.generated)
        for r, lg in rows:
            try:
                ev = r.accept(r.sample(lg[-1]))
            except Exception as e:
                it.fail(r, e)
                continue
            it.tokens += 1
            it.events.append((r, ev))
            if ev.kind == "finish":
                it.finished.append(r)

    def _finish_with_error(self, reqs: list[Request], status: int, message: str) -> None:
        events = []
        with self._cond:
            for r in reqs:
                self._release(r)
                if not r.done and not r.cancelled:
                    events.append((r, Event("error", status=status, message=message)))
                r.done = True
            self._running = [r for r in self._running if not r.done]
        if events:
            self._deliver(events)


class _Iteration:
    """What one loop iteration did: events, finished and failed requests, step counts."""

    def __init__(self):
        self.events: list[tuple[Request, Event]] = []
        self.finished: list[Request] = []
        self.failed: list[tuple[Request, str]] = []
        self.steps = self.rows = self.tokens = self.prefill_tokens = self.decode_steps = self.decode_rows = 0
        self.engine_s = self.decode_engine_s = 0.0

    def fail(self, r: Request, e: BaseException) -> None:
        log.error("request %s failed: %s: %s", r.rid, type(e).__name__, e)
        r.done = True
        self.failed.append((r, f"{type(e).__name__}: {e}"))


def _deliver_to_sinks(events: list[tuple[Request, Event]]) -> None:
    for r, ev in events:
        if r.sink is not None:
            r.sink(ev)
