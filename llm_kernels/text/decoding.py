"""The decode state of one sequence: sampler + incremental detokenizer + stop checker.

:class:`DecodeState` is what a driver (``LLM.generate``, the CLI, a server's scheduler)
keeps per running sequence: feed it each step's logits row with :meth:`DecodeState.sample`,
then the chosen id with :meth:`DecodeState.push`, which returns the text to emit now and
sets ``finish_reason`` once the sequence is done ("stop": EOS, a stop id or a stop string;
"length": ``max_tokens``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .sampling import Sampler, SamplingParams, StopChecker
from .tokenizer import Tokenizer

__all__ = ["DecodeState"]


class DecodeState:
    """Sampling, detokenization and stop conditions of one sequence.

    Args:
        params: validated :class:`SamplingParams`.
        prompt_ids: the prompt (the repetition penalty reads it).
        tokenizer: for text; None decodes nothing (ids only; stop strings never match).
        eos_token_ids: EOS ids (default: the tokenizer's).

    Attributes: ``token_ids`` (generated ids, EOS / stop id included), ``text`` (emitted text),
    ``finish_reason`` (None while running), ``stop_reason``."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], tokenizer: Tokenizer | None = None,
                 eos_token_ids: Iterable[int] | None = None):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.sampler = Sampler(params)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.stop = StopChecker(params, eos_token_ids)
        self.detok = tokenizer.incremental() if tokenizer is not None else None
        self.finish_reason: str | None = "length" if params.max_tokens == 0 else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stop.text

    @property
    def stop_reason(self):
        return self.stop.stop_reason

    def sample(self, logits: torch.Tensor) -> int:
        """The next id from this step's float32 logits row ``[V]`` (or ``[1, V]``)."""
        return self.sampler.next(logits, self.prompt_ids, self.token_ids)

    def push(self, token_id: int) -> str:
        """Record generated ``token_id``; return the text that may be emitted now. Raises
        RuntimeError when the sequence already finished."""
        if self.finished:
            raise RuntimeError(f"DecodeState.push after the sequence finished ({self.finish_reason})")
        self.token_ids.append(int(token_id))
        new = self.detok.add(token_id) if self.detok is not None else ""
        reason, out = self.stop.check(int(token_id), new)
        if reason is not None:
            self.finish_reason = reason
            if self.detok is not None and not isinstance(self.stop.stop_reason, str):
                # EOS / stop id / length (not a stop string): a character cut at the end
                # still comes out (as U+FFFD, like a full decode)
                tail = self.detok.finish()
                self.stop.text += tail
                out += tail
        return out
