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
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import CacheOverflowError
from ..numerics.rounding import check_dtype
from .timing import StageTimer

__all__ = ["EngineCore", "LOGITS_ROWS", "CacheOverflowError"]

LOGITS_ROWS = ("all", "last")


class EngineCore:
    """Sequences and steps of one model over its caches (see the module docstring).

    Args:
        cfg: the model config (``vocab_size`` is read here).
        dtype: activation dtype, ``torch.float32`` or ``torch.bfloat16``.
        timer: optional :class:`StageTimer` (disabled when None).

    Raises ValueError for another dtype."""

    def __init__(self, cfg: Any, dtype: torch.dtype, timer: StageTimer | None = None):
        check_dtype(dtype)
        self.cfg, self.dtype = cfg, dtype
        self.timer = timer or StageTimer(enabled=False)
        self._next_id = 0

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

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[torch.Tensor]]:
        """New sequences from ``prompts``, run as one batch step; returns (seq_ids, float32
        logits [len(prompt), V] each). A failed prefill registers nothing."""
        ids = [self.add_sequence() for _ in prompts]
        try:
            return ids, self.step(ids, prompts)
        except Exception:
            for sid in ids:
                self._drop_sequence(sid)
            raise

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int | Sequence[int]]) -> list[torch.Tensor]:
        """Feed one token (or a few) per sequence; returns float32 logits [n, V] per sequence."""
        toks = [[t] if isinstance(t, int) else list(t) for t in tokens]
        return self.step(seq_ids, toks)

    # ------------------------------------------------------------------ one step
    def step(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]],
             logits_rows: str = "all") -> list[torch.Tensor]:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]`` for every b and return the float32
        logits of the new tokens, [len(tokens[b]), V] each (``logits_rows="last"``: only the
        last row of each sequence, [1, V]; the head then reads one row per sequence).

        Raises KeyError for an unknown sequence id; ValueError for mismatched lists, a
        repeated sequence, an empty token list, an out-of-vocabulary id or a bad
        ``logits_rows``; CacheOverflowError when a sequence would pass its capacity. On
        error no sequence changes."""
        if logits_rows not in LOGITS_ROWS:
            raise ValueError(f"logits_rows must be one of {LOGITS_ROWS}, got {logits_rows!r}")
        if len(seq_ids) != len(tokens):
            raise ValueError(f"{len(seq_ids)} sequence ids but {len(tokens)} token lists")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence may appear once per step, got {list(seq_ids)}")
        starts = [self.length(s) for s in seq_ids]  # KeyError for an unknown id
        lens = [len(t) for t in tokens]
        for s, n in zip(seq_ids, lens):
            if n == 0:
                raise ValueError(f"sequence {s}: empty token list")
        flat = [int(t) for ts in tokens for t in ts]
        V = self.cfg.vocab_size
        bad = [t for t in flat if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids must be in [0, {V}), got {bad[:5]}")
        ids = torch.tensor(flat, dtype=torch.long)
        with self.timer("kv_cache"):  # capacity check / page allocation for the whole step
            state = self._reserve(seq_ids, lens)
        try:
            x = self._forward(ids, seq_ids, starts, lens, state)
            offs = [0]
            for n in lens:
                offs.append(offs[-1] + n)
            if logits_rows == "last":
                x = x[torch.tensor([o - 1 for o in offs[1:]])]
                offs = list(range(len(lens) + 1))
            with self.timer("lm_head"):
                logits = self._lm_head(x)
        except Exception:
            self._rollback(seq_ids, lens, state)
            raise
        self._commit(seq_ids, tokens, state)
        return [logits[offs[b]:offs[b + 1]] for b in range(len(lens))]
