"""The Python API (``llm_kernels.api``) on a small random checkpoint: greedy ids equal an
engine-level greedy loop for a ragged batch whose sequences leave at different steps,
streamed text, stop ids / EOS / multi-token stop strings, seeded sampling, chat and a chat
session reusing its cache, and errors naming the bad input."""

from __future__ import annotations

import pytest
import torch

from llm_kernels import LLM, SamplingParams, models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.errors import TokenizerError

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPTS = ["Hello world", "你好 😀", "The quick brown fox jumps"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("api-mini")
    write_random_checkpoint(models.preset("mini", num_hidden_layers=2), out, seed=11, dtype=torch.float32,
                            progress=False)
    return out


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, backend="reference", dtype="float32", max_seq_len=64, max_batch=2)


def _engine_greedy(ckpt, prompt: list[int], n: int) -> list[int]:
    """Greedy ids from a separately built engine: full logits, argmax per step."""
    cfg, w = load_checkpoint(ckpt, dtype=torch.float32, progress=False)
    eng = models.spec_for_config(cfg).make_engine(w, cfg, dtype=torch.float32, max_seq_len=64)
    (sid,), (lg,) = eng.prefill([prompt])
    out = [int(lg[-1].argmax())]
    while len(out) < n:
        out.append(int(eng.decode([sid], [out[-1]])[0][-1].argmax()))
    return out


@pytest.fixture(scope="module")
def reference(ckpt, llm):
    """Engine-level greedy continuations (16 ids) of PROMPTS, with EOS ignored."""
    return [_engine_greedy(ckpt, llm.tokenizer.encode(p), 16) for p in PROMPTS]


def test_ragged_batch_greedy_equals_engine_greedy(llm, reference):
    # prompt 0 stops at its 3rd token (a stop id), so prompt 2 joins while prompt 1 still runs
    stop_id = reference[0][2]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id], ignore_eos=True)
    streamed = {i: "" for i in range(3)}
    outs = llm.generate(PROMPTS, params, on_text=lambda i, s: streamed.__setitem__(i, streamed[i] + s))
    for i, (o, ref) in enumerate(zip(outs, reference)):
        n = next((k + 1 for k, t in enumerate(ref[:8]) if t == stop_id), 8)
        assert o.token_ids == ref[:n], i
        assert o.prompt_token_ids == llm.tokenizer.encode(PROMPTS[i])
        assert o.finish_reason == ("stop" if n < 8 or ref[7] == stop_id else "length")
        assert o.text == streamed[i]
        assert o.timings["completion_tokens"] == n and o.timings["prefill_s"] > 0
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == stop_id and len(outs[0].token_ids) == 3


def test_ids_prompts_and_text(llm, reference):
    (o,) = llm.generate([llm.tokenizer.encode(PROMPTS[1])], SamplingParams(temperature=0, max_tokens=6,
                                                                           ignore_eos=True))
    assert o.token_ids == reference[1][:6]
    assert o.text == llm.tokenizer.decode(o.token_ids)
    assert llm.generate(llm.tokenizer.encode(PROMPTS[1]), SamplingParams(temperature=0, max_tokens=6,
                                                                         ignore_eos=True))[0].token_ids == o.token_ids


def test_eos_ends_the_sequence(llm, reference):
    eos = reference[0][3]
    saved = llm.eos_token_ids
    llm.eos_token_ids = frozenset({eos})
    try:
        (o,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))
        (g,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        llm.eos_token_ids = saved
    k = reference[0].index(eos)
    assert o.finish_reason == "stop" and o.token_ids == reference[0][:k + 1] and o.stop_reason is None
    assert len(g.token_ids) == 12


def _two_token_stop(llm, full) -> str | None:
    """A stop string spanning two tokens' text (the last char of one token's text and the first
    of the next non-empty one), at its first occurrence in the text; None if there is none."""
    inc = llm.tokenizer.incremental()
    pieces = [inc.add(t) for t in full.token_ids]
    for j in range(len(pieces) - 1):
        nxt = next((k for k in range(j + 1, len(pieces)) if pieces[k]), None)
        if not pieces[j] or nxt is None:
            continue
        cand = pieces[j][-1] + pieces[nxt][0]
        if "\ufffd" not in cand and full.text.find(cand) == len("".join(pieces[:j + 1])) - 1:
            return cand
    return None


def test_multi_token_stop_string(llm):
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for prompt in PROMPTS:
        (full,) = llm.generate(prompt, p)
        stop = _two_token_stop(llm, full)
        if stop is not None:
            break
    assert stop is not None, "no clean two-token boundary in the random outputs"
    streamed = []
    (o,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                        on_text=lambda _i, t: streamed.append(t))
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == full.text[:full.text.find(stop)] == "".join(streamed) and stop not in o.text
    assert o.token_ids == full.token_ids[:len(o.token_ids)] and len(o.token_ids) < len(full.token_ids)


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    a, b = llm.generate(PROMPTS[0], p)[0], llm.generate(PROMPTS[0], p)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=8,
                                                ignore_eos=True))[0]
    assert c.token_ids != a.token_ids


def test_max_tokens_clamped_and_zero(llm):
    (o,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=0))
    assert o.token_ids == [] and o.finish_reason == "length" and o.text == ""
    (o,) = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(o.token_ids) == 64 - 60 + 1 and o.finish_reason == "length"  # the cache holds all but the last


def test_chat_and_session_reuse(llm):
    msgs = [{"role": "user", "content": "hi"}]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    c = llm.chat(msgs, one, enable_thinking=False)
    (g,) = llm.generate([llm.tokenizer.encode_chat(msgs, enable_thinking=False)], one)
    assert c.token_ids == g.token_ids
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    # thinking on: the next rendered prompt extends the cached one -> only the new turn is prefilled
    s = llm.chat_session()
    first = s.send("hi", one)
    assert s.last_reused == 0
    n1 = len(first.prompt_token_ids)
    second = s.send("more", p)
    assert s.last_reused == n1 and second.timings["cached_tokens"] == n1
    assert second.token_ids == llm.chat(s.messages[:-1], p).token_ids  # same as a fresh run
    assert llm.engine.length(s.sid) == len(s.cached)
    s.close()
    # enable_thinking=False: the template drops the empty think block from earlier turns, the
    # prompt no longer extends the cache, and the turn is prefilled again (same reply)
    s = llm.chat_session(enable_thinking=False)
    s.send("hi", one)
    second = s.send("more", p)
    assert s.last_reused == 0
    assert second.token_ids == llm.chat(s.messages[:-1], p, enable_thinking=False).token_ids
    s.close()


def test_errors_name_the_input(llm, ckpt, tmp_path):
    with pytest.raises(ValueError, match="top_p must be a number in"):
        llm.generate("x", SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="stop_token_ids must be a list of ints in \\[0, 512\\)"):
        llm.generate("x", SamplingParams(stop_token_ids=[512]))
    with pytest.raises(ValueError, match=r"prompts\[1\]: token ids must be in \[0, 512\)"):
        llm.generate([[1, 2], [3, 600]])
    with pytest.raises(ValueError, match=r"prompts\[0\]: 70 tokens exceed max_seq_len = 64"):
        llm.generate([[1] * 70])
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        llm.generate([""])
    with pytest.raises(ValueError, match="at least one prompt"):
        llm.generate([])
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(ckpt, dtype="float16")
    bare = tmp_path / "bare"
    write_random_checkpoint(models.preset("mini", num_hidden_layers=1), bare, seed=1, dtype=torch.float32,
                            progress=False, tokenizer=False)
    ids_only = LLM(bare, backend="reference", dtype="float32", max_seq_len=16)
    assert ids_only.tokenizer is None and ids_only.eos_token_ids == {1}  # config.json's eos_token_id
    assert len(ids_only.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3,
                                                             ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        ids_only.generate("text")
