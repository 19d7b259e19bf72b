"""Sampling parameters, the per-sequence sampler and the stop checker.

* :class:`SamplingParams`: the options of one request (vLLM / OpenAI names), validated by
  :meth:`SamplingParams.validate`; :meth:`SamplingParams.from_generation_config` takes the
  defaults from a checkpoint's ``generation_config.json`` (as transformers' ``generate``
  does).
* :class:`Sampler`: one sequence's next token from its float32 logits ``[V]``. The order is
  transformers' ``generate``: repetition penalty (over prompt + generated ids,
  ``RepetitionPenaltyLogitsProcessor``), presence / frequency penalties (over generated ids,
  OpenAI's definition), then temperature, top-k, top-p, min-p
  (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
  ``MinPLogitsWarper``; the same formulas, ties and ``min_tokens_to_keep=1``), then a draw
  from the softmax with the sequence's own ``torch.Generator``. Temperature 0 is greedy: the
  argmax of the penalised logits (the first index on a tie, as ``torch.argmax``).
* :class:`StopChecker`: EOS / ``stop_token_ids`` / ``max_tokens`` and stop strings that may
  span several tokens: text is held back while it could still be the start of a stop
  string, and the stop string itself is never emitted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["SamplingParams", "Sampler", "StopChecker", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """Options of one generation request.

    Fields (defaults in brackets):
        max_tokens [256]: new tokens at most (int >= 0; 0 = prefill only).
        temperature [1.0]: >= 0; 0 means greedy (argmax).
        top_k [0]: keep the k most likely tokens (ties at the k-th kept); 0 or -1 = off.
        top_p [1.0]: nucleus mass in (0, 1]; 1 = off.
        min_p [0.0]: drop tokens with probability < min_p * max probability, in [0, 1].
        repetition_penalty [1.0]: > 0; transformers' rule over prompt + generated ids
            (positive logits divided, negative ones multiplied); 1 = off.
        presence_penalty, frequency_penalty [0.0]: in [-2, 2]; OpenAI's rule over the generated
            ids: ``logit -= presence * (count > 0) + frequency * count``.
        seed [None]: int in [0, 2**63); None draws a fresh seed per sequence.
        stop [[]]: stop strings (non-empty); a str is taken as a one-element list.
        stop_token_ids [[]]: ids that end the sequence like EOS (the id's text is not emitted).
        ignore_eos [False]: keep going past the tokenizer's / generation config's EOS ids.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when temperature is 0 (argmax decoding)."""
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field; returns self. ``vocab_size`` (if given) bounds ``stop_token_ids``.

        Raises ValueError naming the field, the expected range and the value given."""
        def bad(name: str, expected: str):
            raise ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "an int >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "an int >= 0 (0 or -1 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                bad(name, "a number in [-2, 2]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            bad("seed", "None or an int in [0, 2**63)")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "a list of non-empty strings")
        hi = vocab_size if vocab_size is not None else 2 ** 63
        if any(not is_int(t) or not 0 <= t < hi for t in self.stop_token_ids):
            bad("stop_token_ids", f"a list of ints in [0, {vocab_size if vocab_size is not None else '2**63'})")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "a bool")
        return self

    @classmethod
    def from_generation_config(cls, path: str | Path, **overrides) -> "SamplingParams":
        """Defaults from ``path/generation_config.json`` (a directory or the file itself; a
        missing file gives the class defaults), then ``overrides`` (field=value; a value of
        None is ignored, so unset CLI flags can be passed through).

        Read keys: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
        ``repetition_penalty``, ``max_new_tokens`` -> max_tokens. As transformers'
        ``GenerationConfig`` (``do_sample`` defaults to False), decoding is greedy
        (temperature 0) unless the file says ``do_sample: true``; a missing file is greedy
        too. An explicit ``temperature`` override wins.
        Raises ValueError for an unknown override name or an invalid result (see
        :meth:`validate`), or for a generation_config.json that is not a JSON object."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s) {unknown}; expected some of {sorted(names)}")
        p = Path(path)
        gfile = p / "generation_config.json" if p.is_dir() else p
        kw: dict = {"temperature": 0.0}
        if gfile.is_file():
            try:
                gc = json.loads(gfile.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{gfile}: not valid JSON ({e})") from None
            if not isinstance(gc, dict):
                raise ValueError(f"{gfile}: expected a JSON object, got {type(gc).__name__}")
            for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
                if gc.get(key) is not None:
                    kw[key] = gc[key]
            if gc.get("max_new_tokens") is not None:
                kw["max_tokens"] = gc["max_new_tokens"]
            if gc.get("do_sample") is not True:
                kw["temperature"] = 0.0
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw).validate()


# ---------------------------------------------------------------------------- logits processing
def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    generated_ids: list[int]) -> torch.Tensor:
    """Repetition penalty over ``prompt_ids + generated_ids`` (transformers' rule, each id
    once), then presence / frequency penalties over ``generated_ids``. ``logits``: float32
    ``[V]``; returns a new tensor (ids >= V are ignored)."""
    out = logits.clone()
    V = out.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in prompt_ids + generated_ids if 0 <= t < V}), dtype=torch.long)
        if seen.numel():
            s = out[seen]
            out[seen] = torch.where(s < 0, s * params.repetition_penalty, s / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated_ids:
        ids = torch.tensor([t for t in generated_ids if 0 <= t < V], dtype=torch.long)
        counts = torch.bincount(ids, minlength=V)[:V].to(out.dtype)
        out -= params.presence_penalty * (counts > 0).to(out.dtype) + params.frequency_penalty * counts
    return out


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p (transformers' warpers, in that order, filter value
    -inf, at least one token kept) on float32 logits ``[V]`` or ``[B, V]``; returns the
    processed scores whose softmax is the sampling distribution."""
    scores = logits if logits.dim() == 2 else logits[None]
    if params.temperature not in (0, 1):
        scores = scores / params.temperature
    neg = -float("inf")
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], neg)
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, neg)
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < params.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, neg)
    return scores if logits.dim() == 2 else scores[0]


class Sampler:
    """Next-token choice for one sequence (see the module docstring for the order).

    Args:
        params: validated :class:`SamplingParams`; ``params.seed`` seeds this sequence's own
            ``torch.Generator`` (None: a fresh random seed), so a seeded sequence draws the
            same tokens whatever else runs in the batch.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def probs(self, logits: torch.Tensor, prompt_ids: list[int], generated_ids: list[int]) -> torch.Tensor:
        """The sampling distribution float32 ``[V]`` of a non-greedy sequence (penalties,
        then :func:`filter_logits`, then softmax): what :meth:`next` draws from.
        Raises ValueError when greedy or when no logit is finite."""
        if self.params.greedy:
            raise ValueError("probs: a greedy sequence has no sampling distribution")
        if logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        scores = filter_logits(apply_penalties(logits.float(), self.params, prompt_ids, generated_ids), self.params)
        if not torch.isfinite(scores).any():
            raise ValueError("logits: no finite value to sample from")
        return torch.softmax(scores, dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        """One id drawn from ``probs`` [V] (need not sum to 1) with this sequence's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A uniform draw in [0, 1) from this sequence's generator."""
        return float(torch.rand((), generator=self.generator))

    def next(self, logits: torch.Tensor, prompt_ids: list[int], generated_ids: list[int]) -> int:
        """The next token id from ``logits`` (float32 ``[V]``, or ``[1, V]``).

        Raises ValueError when ``logits`` is not one row of a float tensor or when a
        non-greedy distribution has no finite logit."""
        if logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 1 or not logits.is_floating_point():
            raise ValueError(f"logits must be a float tensor [V], got {logits.dtype} {tuple(logits.shape)}")
        scores = apply_penalties(logits.float(), self.params, prompt_ids, generated_ids)
        if self.params.greedy:
            return int(torch.argmax(scores))
        scores = filter_logits(scores, self.params)
        if not torch.isfinite(scores).any():
            raise ValueError("logits: no finite value to sample from")
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class StopChecker:
    """Finish conditions of one sequence and the text it may emit so far.

    Args:
        params: the request's :class:`SamplingParams` (``stop``, ``stop_token_ids``,
            ``max_tokens``, ``ignore_eos``).
        eos_token_ids: the tokenizer's / generation config's EOS ids (ignored with
            ``params.ignore_eos``).

    :meth:`check` is called once per generated token with that token's newly decoded text
    (from :class:`~llm_kernels.text.tokenizer.IncrementalDetokenizer`). Attributes:
    ``finish_reason`` (None, "stop" or "length"), ``stop_reason`` (the matched stop string or
    stop token id, None for EOS / length), ``text`` (everything emitted)."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int] = ()):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stop_strings = [s for s in params.stop if s]
        self.pending = ""  # text held back: could still be the start of a stop string
        self.text = ""
        self.count = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def _emit(self, s: str) -> str:
        self.text += s
        return s

    def check(self, token_id: int, new_text: str) -> tuple[str | None, str]:
        """Account for one generated token; returns ``(finish_reason, text_to_emit)`` where
        finish_reason is None (go on), "stop" (EOS, a stop token id or a stop string) or
        "length" (``max_tokens`` reached). On a stop string the text before it is emitted
        and the rest dropped. Raises RuntimeError when called after the sequence finished."""
        if self.finish_reason is not None:
            raise RuntimeError(f"StopChecker.check called after the sequence finished ({self.finish_reason})")
        self.count += 1
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            self.stop_reason = token_id if token_id in self.params.stop_token_ids else None
            out, self.pending = self.pending, ""
            return self.finish_reason, self._emit(out)
        buf = self.pending + new_text
        hit = min(((buf.find(s), s) for s in self.stop_strings if s in buf), default=None)
        if hit is not None:
            self.finish_reason, self.stop_reason = "stop", hit[1]
            self.pending = ""
            return self.finish_reason, self._emit(buf[:hit[0]])
        if self.count >= self.params.max_tokens:
            self.finish_reason = "length"
            self.pending = ""
            return self.finish_reason, self._emit(buf)
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return None, self._emit(buf[:len(buf) - hold])

    def flush(self) -> str:
        """Text still held back (call when the sequence ends for another reason)."""
        out, self.pending = self.pending, ""
        return self._emit(out)

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
