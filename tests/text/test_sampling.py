"""Sampling (``llm_kernels.text.sampling``) against transformers' logits processors on the
same logits (same filtered support, probabilities within fp32 rounding), seeded
reproducibility, validation, and the stop checker (EOS, stop ids, multi-token stop strings,
length)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_kernels.text.sampling import Sampler, SamplingParams, StopChecker, apply_penalties, filter_logits

V = 1000


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 3
    x[:5] = x[:5].round()  # a few exact ties at the top-k / top-p boundaries
    x[5:10] = x[0]
    return x


def _hf(params: SamplingParams) -> LogitsProcessorList:
    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature not in (0, 1):
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        procs.append(MinPLogitsWarper(params.min_p))
    return LogitsProcessorList(procs)


CASES = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=40),
    dict(top_k=6),  # the boundary lies inside the 10-way tie: all tied tokens kept
    dict(temperature=0.8, top_p=0.9),
    dict(top_p=0.5, temperature=2.0),
    dict(min_p=0.1),
    dict(min_p=0.05, temperature=0.5),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02),
    dict(temperature=0.6, top_k=20, top_p=0.95),  # Qwen3's generation_config
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distribution_equals_transformers_processors(case, seed):
    params = SamplingParams(**case).validate()
    logits = _logits(seed)
    prompt, generated = [3, 5, 17, 17, 999], [42, 5, 600]
    ours = filter_logits(apply_penalties(logits, params, prompt, generated), params)
    theirs = _hf(params)(torch.tensor([prompt + generated]), logits[None].clone())[0]
    keep = torch.isfinite(ours)
    assert torch.equal(keep, torch.isfinite(theirs)), "different filtered support"
    assert 0 < int(keep.sum()) < V or case.keys() <= {"temperature", "repetition_penalty"}
    p_ours, p_theirs = torch.softmax(ours, -1), torch.softmax(theirs, -1)
    assert (p_ours - p_theirs).abs().max().item() <= 4 * torch.finfo(torch.float32).eps
    assert abs(p_ours.sum().item() - 1) < 1e-5


def test_filters_do_filter():
    logits = torch.arange(20.0)
    logits[15:] = 19.0  # a 5-way tie at the top
    kept = lambda **kw: int(torch.isfinite(filter_logits(logits, SamplingParams(**kw))).sum())  # noqa: E731
    assert kept(top_k=3) == 5  # ties at the k-th value are kept
    assert kept(top_k=10) == 10
    assert kept(top_p=1e-6) == 1
    assert kept(min_p=1.0) == 5  # only the tied maximum survives
    assert kept(min_p=0.005) == 6  # e**-5 = 0.0067 >= 0.005 keeps logit 14, e**-6 drops 13


def test_presence_and_frequency_penalties():
    logits = torch.zeros(8)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, p, prompt_ids=[1, 2], generated_ids=[3, 3, 4])
    want = torch.zeros(8)
    want[3] = -(0.5 + 2 * 0.25)
    want[4] = -(0.5 + 0.25)
    assert torch.equal(out, want)  # prompt ids are not penalised by presence/frequency
    assert torch.equal(logits, torch.zeros(8))  # input untouched


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([1.0, 5.0, 4.9, -2.0])
    s = Sampler(SamplingParams(temperature=0))
    assert s.next(logits, [], []) == 1
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.1))
    assert s.next(logits, [1], []) == 2
    assert s.next(logits[None], [], []) == 1  # one [1, V] row is accepted


def test_seeded_runs_reproduce_and_follow_the_distribution():
    logits = _logits(4)
    p = SamplingParams(temperature=1.0, top_k=5, seed=1234)

    def draw(params, n=300):
        s = Sampler(params)
        return [s.next(logits, [], []) for _ in range(n)]

    a, b = draw(p), draw(p)
    assert a == b
    assert draw(SamplingParams(temperature=1.0, top_k=5, seed=99)) != a
    support = set(torch.nonzero(torch.isfinite(filter_logits(logits, p))).flatten().tolist())
    assert set(a) <= support and len(set(a)) > 1
    # unseeded samplers differ from each other (fresh seeds)
    assert draw(SamplingParams(top_k=5)) != draw(SamplingParams(top_k=5))


@pytest.mark.parametrize("field,value,match", [
    ("max_tokens", -1, "max_tokens must be an int >= 0"),
    ("temperature", -0.1, "temperature must be a finite number >= 0"),
    ("temperature", float("nan"), "temperature"),
    ("top_k", -2, "top_k must be an int >= 0"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, "top_p"),
    ("min_p", 1.1, r"min_p must be a number in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
    ("presence_penalty", 2.5, r"presence_penalty must be a number in \[-2, 2\]"),
    ("frequency_penalty", -3, "frequency_penalty"),
    ("seed", -1, "seed must be None or an int"),
    ("stop", [""], "stop must be a list of non-empty strings"),
    ("stop_token_ids", [512], r"stop_token_ids must be a list of ints in \[0, 512\)"),
    ("ignore_eos", 1, "ignore_eos must be a bool"),
])
def test_validation_names_the_field_and_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value}).validate(vocab_size=512)


def test_from_generation_config(tmp_path):
    # no file: the defaults, greedy (transformers' GenerationConfig has do_sample=False)
    assert SamplingParams.from_generation_config(tmp_path) == SamplingParams(temperature=0.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))   # no do_sample
    assert SamplingParams.from_generation_config(tmp_path).greedy
    assert SamplingParams.from_generation_config(tmp_path, temperature=0.7).temperature == 0.7
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_new_tokens": 77}))
    p = SamplingParams.from_generation_config(tmp_path, top_k=None, seed=3, stop="END")
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.seed, p.stop) == (0.6, 20, 0.95, 77, 3, ["END"])
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingParams.from_generation_config(tmp_path).greedy
    with pytest.raises(ValueError, match="unknown SamplingParams field"):
        SamplingParams.from_generation_config(tmp_path, temprature=1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config(tmp_path)


# ---------------------------------------------------------------------------- stop checker
def _run(checker: StopChecker, pieces: list[tuple[int, str]]):
    out, reason = [], None
    for tid, text in pieces:
        reason, emit = checker.check(tid, text)
        out.append(emit)
        if reason:
            break
    return reason, out


def test_stop_string_across_tokens_is_held_back_and_not_emitted():
    c = StopChecker(SamplingParams(stop=["<END>", "xyz"], max_tokens=100))
    reason, out = _run(c, [(10, "Hello <"), (11, "E"), (12, "N"), (13, "D> after")])
    assert reason == "stop" and c.stop_reason == "<END>"
    assert out == ["Hello ", "", "", ""] and c.text == "Hello "


def test_a_false_start_is_released():
    c = StopChecker(SamplingParams(stop=["<END>"], max_tokens=100))
    reason, out = _run(c, [(1, "a <E"), (2, "X> b"), (3, " c")])
    assert reason is None and "".join(out) == "a <EX> b c" and out[0] == "a "


def test_stop_inside_one_token_keeps_text_before_it():
    c = StopChecker(SamplingParams(stop=["\n\n"], max_tokens=100))
    assert c.check(5, "line one\n\nline two") == ("stop", "line one")


def test_eos_and_stop_token_ids_flush_held_text():
    c = StopChecker(SamplingParams(stop=["STOP"], max_tokens=100), eos_token_ids=[2])
    assert c.check(7, "abc ST") == (None, "abc ")
    assert c.check(2, "") == ("stop", "ST") and c.stop_reason is None
    c = StopChecker(SamplingParams(stop_token_ids=[9], max_tokens=100), eos_token_ids=[2])
    assert c.check(9, "") == ("stop", "") and c.stop_reason == 9
    c = StopChecker(SamplingParams(ignore_eos=True, max_tokens=100), eos_token_ids=[2])
    assert c.check(2, "x") == (None, "x")
    done = StopChecker(SamplingParams(max_tokens=1))
    done.check(1, "a")
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        done.check(1, "b")


def test_length_flushes_and_eos_wins_on_the_last_token():
    c = StopChecker(SamplingParams(stop=["zz"], max_tokens=2), eos_token_ids=[0])
    assert c.check(4, "a z") == (None, "a ")
    assert c.check(5, "b") == ("length", "zb")
    c = StopChecker(SamplingParams(max_tokens=1), eos_token_ids=[0])
    assert c.check(0, "") == ("stop", "")
