"""The model-neutral part of every engine: sequence bookkeeping, step validation, the
reserve -> forward -> logits -> commit order with rollback, and logits-row selection.

A model's engine subclasses :class:`EngineCore` and implements five hooks over its own
cache (``runtime/<model>/engine.py``):

* ``_new_sequence(sid)`` / ``_drop_sequence(sid)`` / ``_length(sid)``;
* ``_reserve(seq_ids, lens)``: check capacity for the whole step (raise
  :class:`~llm_kernels.errors.CacheOverflowError` before writing anything) and return a
  step state; ``_rollback(seq_ids, lens, state)`` undoes it if the forward fails;
* ``_forward(ids, seq_ids, starts, lens, state)``: the decoder layers over the packed
  ``[ΣT]`` rows, returning the final hidden rows (first dim ``ΣT``);
* ``_commit(seq_ids, tokens, state)``: advance the sequences after a successful step;
* ``_lm_head(x)``: final norm + head on the selected rows -> float32 logits ``[rows, V]``.

Optional hooks: ``_check_room(seq_ids, starts, lens)`` (capacity of a whole chunked step,
checked before its first chunk; the default checks ``max_seq_len`` when the engine has
one) and ``_save_state(seq_ids)`` / ``_restore_state(seq_ids, saved)`` (undo a chunked
step on sequences that already hold tokens; without them such a step runs as one step).

Pipeline stages: an engine built for a layer range (``layers=(first, stop)``) holds the
``pipe`` link of its stage (set by :mod:`llm_kernels.distributed`, a
:class:`PipelineLink`): ``_forward`` takes its input rows from the previous stage instead of
the embedding unless ``pipe.is_first``, sends its output to the next stage unless
``pipe.is_last``, and the head's logits come from the last stage (``pipe.share_logits``),
so every stage returns the same logits. A chunked step shares its logits once, after its
last chunk: sends do not wait for the next stage, so stage ``s`` runs chunk ``k + 1``
while stage ``s + 1`` runs chunk ``k`` (a pipelined prefill).

Chunked prefill (llama.cpp's ``--ubatch-size``, vLLM's ``max_num_batched_tokens``): a step
of more than ``prefill_chunk`` rows (over all its sequences) runs as successive sub-steps
of at most that many rows, so activations are allocated for one chunk, not for the whole
prompt. See :meth:`EngineCore.step` and ``docs/runtime.md`` ("Chunked prefill").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from ..errors import CacheOverflowError
from ..numerics.rounding import check_dtype
from .timing import StageTimer

__all__ = ["EngineCore", "PendingStep", "PipelineLink", "LOGITS_ROWS", "CacheOverflowError", "DEFAULT_PREFILL_CHUNK", "plan_chunks",
           "check_chunk_tokens"]

LOGITS_ROWS = ("all", "last")

#: Rows per sub-step of a chunked step (the engines' default ``prefill_chunk``), chosen from
#: measurements at DeepSeek-V4 Flash dims (docs/runtime.md, "Chunked prefill": peak RSS and
#: prefill time for 256 … 2048 rows and for one 4096-row step).
DEFAULT_PREFILL_CHUNK = 256

_EMPTY = object()  # step() undo marker: every sequence of the step was empty


def check_chunk_tokens(n: Any, what: str = "prefill_chunk") -> int | None:
    """``n`` as a chunk size: an int >= 1, or None for no chunking (0 and None both mean
    "the whole step at once"). Raises ValueError naming ``what`` otherwise (bools, floats,
    negative numbers)."""
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n == 0):
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be an integer >= 1 (or 0 / None: no chunking), got {n!r}")
    return n


def plan_chunks(lens: Sequence[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Split a step's rows into sub-steps of at most ``chunk`` rows: the rows of all
    sequences in order (sequence 0's, then sequence 1's, ...), cut every ``chunk`` rows.
    Returns one list per sub-step of ``(b, lo, hi)``: rows ``lo:hi`` of sequence ``b``
    (each sequence appears at most once per sub-step, with consecutive row ranges across
    sub-steps). ``chunk`` >= 1; lens >= 1 each."""
    plan, cur, room = [], [], chunk
    for b, n in enumerate(lens):
        lo = 0
        while lo < n:
            take = min(room, n - lo)
            cur.append((b, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                plan.append(cur)
                cur, room = [], chunk
    if cur:
        plan.append(cur)
    return plan


class PipelineLink(Protocol):
    """One pipeline stage's link to its neighbours (implemented in
    :mod:`llm_kernels.distributed.pipeline`). ``is_first`` / ``is_last``: the stage holds the
    embedding / the head; ``stages``: how many there are."""

    is_first: bool
    is_last: bool
    stages: int

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's output rows (``shape``, ``dtype``)."""

    def send_hidden(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Hand this stage's output rows to the next stage, which receives them as ``dtype``
        (ValueError when ``x`` is of another dtype)."""

    def share_logits(self, logits: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        """The last stage's float32 logits ``shape`` on every stage (``logits`` is given on
        the last stage, None elsewhere); waits for this stage's pending sends first."""

    def flush(self) -> None:
        """Wait until this stage's sends have been received."""

    def share_logits_async(self, logits: torch.Tensor | None, shape: tuple[int, int]) -> Callable[[], torch.Tensor]:
        """Post the logits broadcast of :meth:`share_logits` and return a callable that
        waits for it (and for this stage's sends) and returns the logits."""


class PendingStep:
    """A submitted step (:meth:`EngineCore.submit`): :meth:`result` waits for its logits."""

    def __init__(self, wait: Callable[[], list[torch.Tensor]]):
        self._wait, self._out = wait, None

    def result(self) -> list[torch.Tensor]:
        """The step's float32 logits per sequence, [n_b, V] each (waits the first time)."""
        if self._out is None:
            self._out = self._wait()
            self._wait = None
        return self._out


class EngineCore:
    """Sequences and steps of one model over its caches (see the module docstring).

    Args:
        cfg: the model config (``vocab_size`` is read here).
        dtype: activation dtype, ``torch.float32`` or ``torch.bfloat16``.
        timer: optional :class:`StageTimer` (disabled when None).
        prefill_chunk: rows per sub-step of a long step (default
            :data:`DEFAULT_PREFILL_CHUNK`; 0 / None: every step runs whole). Also the
            attribute ``prefill_chunk``, which may be changed at any time.

    Raises ValueError for another dtype or a bad ``prefill_chunk``."""

    def __init__(self, cfg: Any, dtype: torch.dtype, timer: StageTimer | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        check_dtype(dtype)
        self.cfg, self.dtype = cfg, dtype
        self.timer = timer or StageTimer(enabled=False)
        self._next_id = 0
        self.prefill_chunk = prefill_chunk
        self.pipe: PipelineLink | None = None  # set on a pipeline stage (see the module docstring)

    @property
    def prefill_chunk(self) -> int | None:
        """Rows per sub-step of a chunked step (None: no chunking). See :meth:`step`."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int | None) -> None:
        self._prefill_chunk = check_chunk_tokens(n)

    # ------------------------------------------------------------------ hooks
    def _new_sequence(self, sid: int) -> None:
        raise NotImplementedError

    def _drop_sequence(self, sid: int) -> None:
        raise NotImplementedError

    def _length(self, sid: int) -> int:
        """Tokens already in sequence ``sid``; KeyError for an unknown id."""
        raise NotImplementedError

    def _reserve(self, seq_ids: Sequence[int], lens: Sequence[int]) -> Any:
        raise NotImplementedError

    def _rollback(self, seq_ids: Sequence[int], lens: Sequence[int], state: Any) -> None:
        pass

    def _forward(self, ids: torch.Tensor, seq_ids: Sequence[int], starts: Sequence[int],
                 lens: Sequence[int], state: Any) -> torch.Tensor:
        raise NotImplementedError

    def _commit(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], state: Any) -> None:
        pass

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_room(self, seq_ids: Sequence[int], starts: Sequence[int], lens: Sequence[int]) -> None:
        """Raise CacheOverflowError when appending ``lens[b]`` tokens to sequence
        ``seq_ids[b]`` (holding ``starts[b]``) would pass the cache's capacity; called
        before the first sub-step of a chunked step. Default: the engine's
        ``max_seq_len`` per sequence, when it has one (each sub-step's ``_reserve``
        checks again)."""
        cap = getattr(self, "max_seq_len", None)
        if cap is None:
            return
        for s, s0, n in zip(seq_ids, starts, lens):
            if s0 + n > cap:
                raise CacheOverflowError(f"sequence {s} of {s0} tokens cannot take {n} more: cache capacity is "
                                         f"max_seq_len={cap}")

    def _save_state(self, seq_ids: Sequence[int]) -> Any:
        """What :meth:`_restore_state` needs to put non-empty sequences back as they are
        now, or None when the engine cannot (then a step on them is never chunked)."""
        return None

    def _restore_state(self, seq_ids: Sequence[int], saved: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        """Create an empty sequence and return its id."""
        sid = self._next_id
        self._next_id += 1
        self._new_sequence(sid)
        return sid

    def release(self, seq_id: int) -> None:
        """Drop a sequence and free its cache. KeyError for an unknown id."""
        self._drop_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        """Tokens in sequence ``seq_id``. KeyError naming the id when it is unknown."""
        try:
            return self._length(seq_id)
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id!r}") from None

    def prefill(self, prompts: Sequence[Sequence[int]], chunk_tokens: int | None | str = "default",
                logits_rows: str = "all") -> tuple[list[int], list[torch.Tensor]]:
        """New sequences from ``prompts`` (lists of token ids), run as one batch step,
        chunked into sub-steps of at most ``chunk_tokens`` rows over all prompts (default
        ``self.prefill_chunk``; 0 / None: one step). Returns (seq_ids, float32 logits per
        prompt: [len(prompt), V] with ``logits_rows="all"``, [1, V] with ``"last"``).

        Raises what :meth:`step` raises; a failed prefill registers nothing (the new
        sequences are dropped)."""
        ids = [self.add_sequence() for _ in prompts]
        try:
            return ids, self.step(ids, prompts, logits_rows=logits_rows, chunk_tokens=chunk_tokens)
        except BaseException:
            for sid in ids:
                self._drop_sequence(sid)
            raise

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int | Sequence[int]]) -> list[torch.Tensor]:
        """Feed one token (or a few) per sequence as one step (never chunked); returns float32
        logits [n, V] per sequence. Raises what :meth:`step` raises."""
        toks = [[t] if isinstance(t, int) else list(t) for t in tokens]
        return self.step(seq_ids, toks, chunk_tokens=None)

    # ------------------------------------------------------------------ one step
    def step(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], logits_rows: str = "all",
             chunk_tokens: int | None | str = "default",
             on_chunk: Callable[[list[int], list[list[int]]], None] | None = None) -> list[torch.Tensor]:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]`` for every b and return the float32
        logits of the new tokens, [len(tokens[b]), V] each (``logits_rows="last"``: only the
        last row of each sequence, [1, V]; the head then reads one row per sequence).

        Chunking: when the step holds more than ``chunk_tokens`` rows (default
        ``self.prefill_chunk``; 0 / None: never) it runs as successive sub-steps of at most
        that many rows (:func:`plan_chunks`: the sequences' rows in order, cut every
        ``chunk_tokens`` rows), each a full step (reserve, forward, commit), so activations
        are allocated for one chunk. ``"all"`` concatenates the chunks' logits; ``"last"``
        runs the head only in the sub-step holding a sequence's last row, on that row. A
        step is chunked only when it can be undone: every sequence is empty (a failed step
        leaves it empty) or the engine implements ``_save_state``; otherwise it runs whole.
        ``on_chunk(seq_ids, tokens)``: called after every committed sub-step (once for an
        unchunked step) with its sequences and token lists, e.g. to read an engine's
        per-step state such as DeepSeek-V4's ``last_hidden``.

        Raises KeyError for an unknown sequence id; ValueError for mismatched lists, a
        repeated sequence, an empty token list, an out-of-vocabulary id, a bad
        ``logits_rows`` or ``chunk_tokens``; CacheOverflowError when a sequence would pass
        its capacity. On error no sequence changes (in a sub-step or in ``on_chunk``; only an
        ``on_chunk`` error after an unchunked step on non-empty sequences of an engine
        without ``_save_state`` leaves that step done)."""
        chunk = self.prefill_chunk if isinstance(chunk_tokens, str) and chunk_tokens == "default" else \
            check_chunk_tokens(chunk_tokens, "chunk_tokens")
        if logits_rows not in LOGITS_ROWS:
            raise ValueError(f"logits_rows must be one of {LOGITS_ROWS}, got {logits_rows!r}")
        starts, lens, tokens = self._check_step(seq_ids, tokens)
        heads = [logits_rows] * len(lens)
        chunked = chunk is not None and sum(lens) > chunk
        undo: Any = None  # how to undo the step after a committed sub-step: "empty" or _save_state's
        if chunked or on_chunk is not None:
            undo = _EMPTY if not any(starts) else self._save_state(seq_ids)
        if undo is None:  # cannot undo a chunked step on these sequences: run it whole
            chunked = False
        if chunked:
            self._check_room(seq_ids, starts, lens)
            plan = plan_chunks(lens, chunk)
        else:
            plan = [[(b, 0, n) for b, n in enumerate(lens)]]
        parts: list[list[torch.Tensor]] = [[] for _ in lens]
        pipe = self.pipe
        defer = pipe is not None and len(plan) > 1  # one logits broadcast after the last chunk
        held: list[tuple[int, torch.Tensor | int]] = []  # (b, this stage's logits or their row count)
        done = False  # a sub-step was committed
        try:
            for sub in plan:
                sids = [seq_ids[b] for b, _, _ in sub]
                toks = [tokens[b][lo:hi] for b, lo, hi in sub]
                sub_heads = [heads[b] if heads[b] == "all" or hi == lens[b] else None for b, _, hi in sub]
                out = self._step_chunk(sids, toks, [starts[b] + lo for b, lo, _ in sub],
                                       [hi - lo for _, lo, hi in sub], sub_heads, share=not defer)
                done = True
                if on_chunk is not None:
                    on_chunk(sids, toks)
                for (b, _, _), lg in zip(sub, out):
                    if lg is not None:
                        (held.append((b, lg)) if defer else parts[b].append(lg))
            if held:
                parts = self._share_held(held, parts)
            if pipe is not None:
                pipe.flush()
        except BaseException:
            if done and undo is _EMPTY:  # every sequence was empty: empty it again (same id)
                for s in seq_ids:
                    self._drop_sequence(s)
                    self._new_sequence(s)
            elif done and undo is not None:
                self._restore_state(seq_ids, undo)
            raise
        return [p[0] if len(p) == 1 else torch.cat(p, dim=0) for p in parts]

    def _check_step(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]):
        """``(starts, lens, tokens as int lists)`` of a step, or the errors :meth:`step` names."""
        if len(seq_ids) != len(tokens):
            raise ValueError(f"{len(seq_ids)} sequence ids but {len(tokens)} token lists")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence may appear once per step, got {list(seq_ids)}")
        starts = [self.length(s) for s in seq_ids]  # KeyError for an unknown id
        lens = [len(t) for t in tokens]
        for s, n in zip(seq_ids, lens):
            if n == 0:
                raise ValueError(f"sequence {s}: empty token list")
        tokens = [[int(t) for t in ts] for ts in tokens]
        V = self.cfg.vocab_size
        bad = [t for ts in tokens for t in ts if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids must be in [0, {V}), got {bad[:5]}")
        return starts, lens, tokens

    def submit(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]) -> "PendingStep":
        """Start a step (never chunked, logits of every row, like :meth:`decode`) and return
        its :class:`PendingStep`; ``.result()`` gives the float32 logits per sequence.

        On a pipeline stage the step's own work runs now (its layers, the send to the next
        stage, the head on the last stage) and only the logits broadcast is left pending, so
        a driver that keeps up to ``P`` steps of disjoint sequence groups in flight (submit
        group A, submit group B, then A's result, submit A's next step, ...) keeps every
        stage busy: stage ``s`` runs one group while stage ``s + 1`` runs another. Every
        rank must submit and collect in the same order. Without a pipeline the step runs
        at once (``result()`` returns it). The sequences are committed when ``submit``
        returns. Raises what :meth:`step` raises."""
        if self.pipe is None:
            out = self.step(seq_ids, tokens, chunk_tokens=None)
            return PendingStep(lambda: out)
        starts, lens, toks = self._check_step(seq_ids, tokens)
        wait = self._step_chunk(list(seq_ids), toks, starts, lens, ["all"] * len(lens), share="async")
        return PendingStep(wait)

    def _share_held(self, held: list[tuple[int, torch.Tensor | int]], parts: list[list[torch.Tensor]]):
        """A pipelined chunked step's logits: the last stage's held chunks (every stage
        holds their row counts) broadcast at once and split back per sequence."""
        rows = [lg if isinstance(lg, int) else lg.shape[0] for _, lg in held]
        local = torch.cat([lg for _, lg in held]) if self.pipe.is_last else None
        with self.timer("pipeline"):
            allg = self.pipe.share_logits(local, (sum(rows), self.cfg.vocab_size))
        o = 0
        for (b, _), n in zip(held, rows):
            parts[b].append(allg[o:o + n])
            o += n
        return parts

    def _step_chunk(self, seq_ids: list[int], tokens: list[list[int]], starts: list[int], lens: list[int],
                    heads: list[str | None], share: bool | str = True):
        """One validated step: reserve -> forward -> head -> commit (rollback on error).
        ``heads[b]``: "all" (logits of every row of sequence b), "last" (its last row) or
        None (no head rows: its entry of the result is None). On a pipeline stage with
        ``share=False`` the logits stay where they are: the last stage returns its own, the
        others the row counts (the caller shares them later, :meth:`_share_held`); with
        ``share="async"`` the broadcast is posted and a callable returning the list is
        returned instead (:meth:`submit`)."""
        ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        with self.timer("kv_cache"):  # capacity check / page allocation for the whole step
            state = self._reserve(seq_ids, lens)
        try:
            x = self._forward(ids, seq_ids, starts, lens, state)
            offs = [0]
            for n in lens:
                offs.append(offs[-1] + n)
            rows, spans = [], []
            for b, h in enumerate(heads):
                r0 = len(rows)
                if h == "all":
                    rows.extend(range(offs[b], offs[b + 1]))
                elif h == "last":
                    rows.append(offs[b + 1] - 1)
                spans.append((r0, len(rows)) if h is not None else None)
            logits = None
            pipe = self.pipe
            if rows and (pipe is None or pipe.is_last):
                if len(rows) < x.shape[0]:
                    x = x[torch.tensor(rows)]
                with self.timer("lm_head"):
                    logits = self._lm_head(x)
            del x
            if share == "async":
                get = pipe.share_logits_async(logits, (len(rows), self.cfg.vocab_size))
            elif rows and pipe is not None and share:
                with self.timer("pipeline"):
                    logits = pipe.share_logits(logits, (len(rows), self.cfg.vocab_size))
        except Exception:
            self._rollback(seq_ids, lens, state)
            raise
        self._commit(seq_ids, tokens, state)
        if share == "async":
            return lambda: [get()[sp[0]:sp[1]] for sp in spans]
        if logits is None and rows:  # a stage before the last, its logits shared later
            return [sp[1] - sp[0] if sp is not None else None for sp in spans]
        return [logits[sp[0]:sp[1]] if sp is not None else None for sp in spans]
