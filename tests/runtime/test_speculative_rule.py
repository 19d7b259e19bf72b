"""The acceptance rule of speculative decoding (``runtime/speculative.py``): greedy accepts
exactly the main model's own choice; sampling (draft from ``q``, accept with
``min(1, p/q)``, else draw from ``max(p - q, 0)``) emits tokens distributed as the target
``p`` after the sequence's temperature / top-k / top-p / penalties, whatever ``q`` is."""

from __future__ import annotations

import math

import pytest
import torch

from llm_kernels.runtime.speculative import SpecStats, propose, verify
from llm_kernels.text.decoding import DecodeState
from llm_kernels.text.sampling import SamplingParams, apply_penalties, filter_logits

V = 12


def _state(**kw) -> DecodeState:
    st = DecodeState(SamplingParams(max_tokens=100, **kw).validate(vocab_size=V), prompt_ids=[3, 4])
    st.push(5)  # the pending token
    return st


def test_greedy_accepts_only_the_main_models_choice():
    st = _state(temperature=0)
    logits = torch.tensor([0.1 * i for i in range(V)])
    assert verify(st, logits, V - 1, None) == (True, V - 1)
    assert verify(st, logits, 0, None) == (False, V - 1)
    d, q = propose(st, torch.flip(logits, [0]))
    assert d == 0 and q is None


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(temperature=1.0, top_k=5),
                                dict(temperature=0.7, top_p=0.8, repetition_penalty=1.3)])
def test_sampling_rule_preserves_the_target_distribution(kw):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(V, generator=g) * 2
    draft = torch.randn(V, generator=g) * 2  # a different distribution
    st = _state(seed=7, **kw)
    p = torch.softmax(filter_logits(apply_penalties(target, st.params, st.prompt_ids, st.token_ids), st.params), -1)
    n, counts, acc = 20000, torch.zeros(V), 0
    for _ in range(n):
        d, q = propose(st, draft)
        ok, tok = verify(st, target, d, q)
        counts[tok] += 1
        acc += ok
    freq = counts / n
    # each frequency: std <= sqrt(p (1 - p) / n) <= 0.0036; bound 5 std, fixed seed
    bound = 5 * torch.sqrt(p * (1 - p) / n) + 1e-9
    assert ((freq - p).abs() <= bound).all(), (freq, p)
    q_full = torch.softmax(filter_logits(apply_penalties(draft, st.params, st.prompt_ids, st.token_ids),
                                         st.params), -1)
    expected_acc = float(torch.minimum(p, q_full).sum())  # P(accept) = sum_x min(p, q)
    assert abs(acc / n - expected_acc) <= 5 * math.sqrt(expected_acc * (1 - expected_acc) / n) + 1e-9


def test_spec_stats_timings():
    s = SpecStats(steps=4, drafted=4, accepted=3, tokens=7)
    t = s.as_timings()
    assert t["acceptance_rate"] == 0.75 and t["tokens_per_step"] == 1.75
