"""Speculative decoding: the acceptance rule and per-sequence statistics (model-neutral).

A draft model (DeepSeek-V4's MTP block, :meth:`DeepSeekV4Engine.draft
<llm_kernels.runtime.deepseek_v4.engine.DeepSeekV4Engine.draft>`) proposes the token after
the next one; the main model verifies it in the next step, which feeds ``[next, draft]``
(2 rows per sequence). The rule (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding", §2.3; Chen et al. 2023, Algorithm 2):

* greedy: accept iff the draft equals the main model's own greedy choice at that row, so
  the output is token for token what plain greedy decoding gives (exactly, wherever the
  2-row step computes row 0 as a 1-row step does: bitwise on the fused INT8 paths);
* sampling: with target distribution ``p`` and draft distribution ``q`` (both after the
  sequence's penalties / temperature / top-k / top-p / min-p), accept draft ``d`` with
  probability ``min(1, p(d) / q(d))``; on rejection draw from ``max(p - q, 0)``
  renormalised. The emitted token is distributed exactly as ``p``.

On rejection the engine rewinds the draft's row (``engine.rewind(seq, 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..text.decoding import DecodeState

__all__ = ["SpecStats", "propose", "verify"]


@dataclass
class SpecStats:
    """Counts of one sequence: ``steps`` verify steps run, ``drafted`` drafts fed,
    ``accepted`` drafts accepted, ``tokens`` tokens produced by the steps."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    def as_timings(self) -> dict[str, float]:
        return {"spec_steps": self.steps, "draft_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_step": self.tokens / self.steps if self.steps else 0.0}


def propose(state: DecodeState, draft_logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The draft token from the draft model's logits [V] (or [1, V]) of the position after
    the sequence's last generated token (the one about to be fed): greedy sequences take
    the argmax after their penalties; sampling ones draw from their own processed
    distribution ``q``, returned for :func:`verify` (None when greedy)."""
    gen = state.token_ids
    if state.params.greedy:
        return state.sampler.next(draft_logits, state.prompt_ids, gen), None
    q = state.sampler.probs(draft_logits, state.prompt_ids, gen)
    return state.sampler.draw(q), q


def verify(state: DecodeState, logits: torch.Tensor, draft: int, q: torch.Tensor | None) -> tuple[bool, int]:
    """Accept or reject ``draft`` against the main model's logits [V] of the row before it.
    Returns ``(accepted, token)``: the token to emit at that position (``draft`` when
    accepted, else the greedy choice / a draw from the residual distribution)."""
    sampler, gen = state.sampler, state.token_ids
    if state.params.greedy:
        tok = sampler.next(logits, state.prompt_ids, gen)
        return tok == draft, tok
    if q is None:
        raise ValueError("verify: a sampling sequence needs its draft distribution q")
    p = sampler.probs(logits, state.prompt_ids, gen)
    pd, qd = float(p[draft]), float(q[draft])
    if qd > 0 and sampler.uniform() < min(1.0, pd / qd):
        return True, draft
    residual = (p - q).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q where q > 0 (only reachable through rounding)
        residual = p
    return False, sampler.draw(residual)
