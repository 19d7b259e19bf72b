"""Speculative decoding on DeepSeek-V4: the verify step, the rewind of rejected rows, the
MTP draft, and greedy exactness end to end.

* The fused INT8 engine computes a row of a 2-row step (next token + draft) bitwise as a
  1-row step (INT8 GEMMs are exact per row; the kernels' attention sums in the order of
  the query's own entries; the router's float logits run per row in decode-sized steps),
  so a forced
  accept/reject pattern must reproduce plain decoding's logits and caches bit for bit,
  including rejections whose rows closed a ratio-4 window (position 4k+3), the ratio-128
  window (127, 255) and rows past the sliding-window wrap (>= 128).
* The engine's MTP draft (``draft``) vs the stateless reference MTP block
  (``reference/deepseek_v4/mtp.py``) over a whole sequence, fp32: every row within 1e-4.
* ``LLM(speculative="mtp")`` greedy output equals plain greedy output token for token for
  1 and 3 sequences of different lengths (256 tokens), whatever the acceptance.
* A batch of sequences of different lengths decodes each one bitwise as alone (the ragged
  attention call groups rows by index width).
"""

from __future__ import annotations

import pytest
import torch

from llm_kernels import LLM, SamplingParams
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.models import preset
from llm_kernels.reference.deepseek_v4 import model as M
from llm_kernels.reference.deepseek_v4 import mtp as MTP
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine
from llm_kernels.runtime.deepseek_v4.stages import FUSED_OPS, REFERENCE_OPS

PROMPT = [(5 * i + 1) % 500 for i in range(9)]
STEPS = 290  # past positions 255 (second ratio-128 window) and the window wrap at 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(preset("mini", mtp_layers=1), tmp_path_factory.mktemp("mtp") / "m", seed=0,
                                   dtype=torch.bfloat16, progress=False)


def _engine(ckpt, quant="int8", dtype=torch.bfloat16, ops=FUSED_OPS, mtp=False):
    cfg, w = load_checkpoint(ckpt, dtype=dtype, progress=False, quant=quant, mtp=mtp)
    return cfg, DeepSeekV4Engine(w, cfg, dtype, max_seq_len=512, ops=ops)


def _cache_diff(a, b, n_layers):
    """The first cache component where sequence caches ``a`` and ``b`` differ, else None."""
    for li in range(n_layers):
        x, y = a.layers[li], b.layers[li]
        if x.window.end != y.window.end or not torch.equal(x.window.rows, y.window.rows):
            return f"layer {li} window"
        for part in ("compressor", "indexer"):
            p, q = getattr(x, part), getattr(y, part)
            if p is None:
                continue
            if p.n_entries != q.n_entries or not torch.equal(p.valid_entries(), q.valid_entries()):
                return f"layer {li} {part} entries"
            if not (torch.equal(p.buf_kv, q.buf_kv) and torch.equal(p.buf_score, q.buf_score)):
                return f"layer {li} {part} open window"
            if (p.prev_kv is None) != (q.prev_kv is None) or (p.prev_kv is not None and not (
                    torch.equal(p.prev_kv, q.prev_kv) and torch.equal(p.prev_score, q.prev_score))):
                return f"layer {li} {part} overlap halves"
            if not all(torch.equal(u, v) for u, v in zip(p.valid_int8_keys(), q.valid_int8_keys())):
                return f"layer {li} {part} INT8 keys"
    if a.length != b.length or a.token_ids != b.token_ids:
        return "length / token ids"
    return None


def test_batched_decode_rows_are_each_sequence_alone_bitwise(ckpt):
    """Sequences of different lengths decoded in one batch (one ragged attention call per
    layer; their compressed-entry counts differ, so HCA/CSA index widths differ and the
    kernel runs one call per width) give each sequence's logits and caches bit for bit as
    decoding it alone. Positions cross 127 -> 128 (an HCA entry, the window wrap)."""
    prompts = [PROMPT, [(3 * i + 2) % 500 for i in range(45)], [(7 * i + 5) % 500 for i in range(110)]]
    cfg, batch = _engine(ckpt)
    sids, toks = [], []
    for p in prompts:  # prefilled one by one: a > 64-row step may round rows differently
        (s,), (lg,) = batch.prefill([p])
        sids.append(s)
        toks.append(int(lg[-1].argmax()))
    rows = [[] for _ in prompts]
    t = list(toks)
    for _ in range(30):
        out = batch.decode(sids, t)
        for b, o in enumerate(out):
            rows[b].append(o[0])
        t = [int(o[0].argmax()) for o in out]
    for b, p in enumerate(prompts):
        _, alone = _engine(ckpt)
        (s,), (lg,) = alone.prefill([p])
        tok = int(lg[-1].argmax())
        assert tok == toks[b]
        for n in range(30):
            (o,) = alone.decode([s], [tok])
            assert torch.equal(o[0], rows[b][n]), f"sequence {b}, decode step {n} differs from the batch"
            tok = int(o[0].argmax())
        assert _cache_diff(alone.seqs[s], batch.seqs[sids[b]], cfg.num_hidden_layers) is None


def test_forced_accept_reject_equals_plain_decode_bitwise(ckpt):
    cfg, plain = _engine(ckpt)
    (s,), (lg,) = plain.prefill([PROMPT])
    toks, rows = [int(lg[-1].argmax())], []
    for _ in range(STEPS + 2):
        (o,) = plain.decode([s], [toks[-1]])
        rows.append(o[0])
        toks.append(int(o[0].argmax()))
    _, spec = _engine(ckpt)
    spec.journaling = True
    (s2,), _ = spec.prefill([PROMPT])
    P, n, rejected, accepted = len(PROMPT), 0, set(), set()   # toks[n] is pending at position P + n
    while n < STEPS:
        pos = P + n + 1                                          # the draft's position
        accept = pos % 4 != 3 and pos % 7 != 0
        draft = toks[n + 1] if accept else (toks[n + 1] + 1) % cfg.vocab_size
        (o,) = spec.step([s2], [[toks[n], draft]])
        assert torch.equal(o[0], rows[n]), f"verify row 0 at position {P + n} differs from the 1-row step"
        if int(o[0].argmax()) == draft:
            assert torch.equal(o[1], rows[n + 1]), f"accepted draft's row at position {pos} differs"
            accepted.add(pos)
            n += 2
        else:
            spec.rewind(s2, 1)
            rejected.add(pos)
            n += 1
    while spec.length(s2) < plain.length(s):  # catch up, then the caches must be the same bits
        (o,) = spec.decode([s2], [toks[n]])
        assert torch.equal(o[0], rows[n])
        n += 1
    assert spec.length(s2) == plain.length(s)
    assert _cache_diff(spec.seqs[s2], plain.seqs[s], cfg.num_hidden_layers) is None
    # the pattern covered the boundaries it is meant to test
    assert {127, 255} <= rejected and {p for p in rejected if p % 4 == 3 and p > 128}
    assert len(accepted) > 50


def test_rewind_errors(ckpt):
    cfg, eng = _engine(ckpt)
    (s,), _ = eng.prefill([PROMPT])
    with pytest.raises(RuntimeError, match="not journaled"):
        eng.rewind(s, 0)
    eng.journaling = True
    eng.step([s], [[1, 2]])
    with pytest.raises(ValueError, match="keep must be in"):
        eng.rewind(s, 3)
    with pytest.raises(KeyError):
        eng.rewind(s + 99, 1)
    eng.rewind(s, 1)
    assert eng.length(s) == len(PROMPT) + 1
    with pytest.raises(RuntimeError, match="already rewound"):
        eng.rewind(s, 1)


@pytest.mark.parametrize("ops", [REFERENCE_OPS, FUSED_OPS], ids=["reference", "fused"])
def test_engine_draft_matches_reference_mtp_block(ckpt, ops):
    """fp32: the MTP rows fed one at a time through the cached engine vs the stateless
    reference over the whole sequence (positions 0 .. 138: its ratio-4 windows and the
    SWA window of the MTP layer). Observed max |diff| 4.4e-6 on logits of scale ~4.4;
    bound 1e-4 (as tests/kernels/deepseek_v4/test_fused_decode_prefill.py)."""
    cfg, w = load_checkpoint(ckpt, dtype=torch.float32, progress=False, mtp=True)
    ids = torch.tensor([(7 * i + 3) % cfg.vocab_size for i in range(140)])
    ref = MTP.forward_mtp(w, cfg, M.hidden_states(w, cfg, ids, torch.float32), ids, dtype=torch.float32)
    _, eng = _engine(ckpt, quant=None, dtype=torch.float32, ops=ops, mtp=True)
    (s,), _ = eng.prefill([ids[:10].tolist()])
    got = [eng.draft([s], [eng.last_hidden], [ids[1:11].tolist()])[0]]
    for i in range(10, 138):
        eng.decode([s], [int(ids[i])])
        got.append(eng.draft([s], [eng.last_hidden], [[int(ids[i + 1])]])[0])
    assert eng.mtp_length(s) == 138
    assert (torch.cat(got) - ref[9:138]).abs().max().item() <= 1e-4


def test_draft_errors(ckpt):
    cfg, eng = _engine(ckpt, mtp=True)
    (s,), _ = eng.prefill([PROMPT])
    h = eng.last_hidden
    with pytest.raises(ValueError, match="need the decoder's hidden states"):
        eng.draft([s], [torch.cat([h, h[:1]])], [list(range(len(PROMPT) + 1))])
    with pytest.raises(ValueError, match="next ids"):
        eng.draft([s], [h], [[1]])
    with pytest.raises(ValueError, match="must lie in"):
        eng.draft([s], [h[:1]], [[cfg.vocab_size]])
    _, no_mtp = _engine(ckpt)
    (s,), _ = no_mtp.prefill([PROMPT])
    with pytest.raises(RuntimeError, match="without its MTP block"):
        no_mtp.draft([s], [no_mtp.last_hidden], [PROMPT])


@pytest.mark.parametrize("n_seq", [1, 3])
def test_llm_speculative_greedy_equals_plain_greedy(ckpt, n_seq):
    prompts = [[(5 * i + 1) % 500 for i in range(n)] for n in (7, 20, 3)][:n_seq]
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    plain = LLM(ckpt, quant="int8").generate(prompts, params)
    spec = LLM(ckpt, quant="int8", speculative="mtp").generate(prompts, params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert b.timings["spec_steps"] >= 1 and b.timings["draft_tokens"] >= 1
        assert b.timings["tokens_per_step"] == pytest.approx(
            1 + b.timings["accepted_tokens"] / b.timings["spec_steps"], abs=1 / b.timings["spec_steps"])


def test_llm_speculative_needs_mtp_weights(tmp_path):
    ck = write_random_checkpoint(preset("mini"), tmp_path / "m", seed=0, dtype=torch.bfloat16, progress=False)
    with pytest.raises(Exception, match="num_nextn_predict_layers"):
        LLM(ck, speculative="mtp")
    with pytest.raises(ValueError, match="speculative must be"):
        LLM(ck, speculative="eagle")
    with pytest.raises(ValueError, match="draft_tokens must be 1"):
        LLM(ck, speculative="mtp", draft_tokens=2)


@pytest.mark.slow
@pytest.mark.parametrize("n_seq", [1, 3])
def test_flash_dims_speculative_greedy_equals_plain_greedy(tmp_path_factory, n_seq):
    """The 3-layer Flash-dims checkpoint (16 experts) with its MTP block, INT8: 256 greedy
    tokens with and without speculative decoding, 1 and 3 sequences of different lengths.
    Writes a 6.5 GB checkpoint (LLM_KERNELS_FLASH_MTP=DIR reuses one); ~10 minutes."""
    import os

    ck = os.environ.get("LLM_KERNELS_FLASH_MTP")
    if ck is None:
        ck = write_random_checkpoint(preset("flash", num_hidden_layers=3, n_routed_experts=16, mtp_layers=1),
                                     tmp_path_factory.mktemp("flash_mtp") / "f", seed=0, dtype=torch.bfloat16,
                                     progress=False)
    prompts = [[(5 * i + 1) % 129280 for i in range(n)] for n in (7, 20, 3)][:n_seq]
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    plain = LLM(ck, quant="int8", max_seq_len=300).generate(prompts, params)
    spec = LLM(ck, quant="int8", max_seq_len=300, speculative="mtp").generate(prompts, params)
    assert [c.token_ids for c in plain] == [c.token_ids for c in spec]


def test_chat_session_speculative_equals_plain(ckpt):
    """A kept sequence (chat session): drafts run in every turn, the MTP rows stay current
    across turns, and the replies equal plain decoding's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    replies = {}
    for spec in (None, "mtp"):
        chat = LLM(ckpt, quant="int8", speculative=spec).chat_session()
        replies[spec] = [chat.send(m, params) for m in ("hello there", "and again")]
    assert [r.token_ids for r in replies[None]] == [r.token_ids for r in replies["mtp"]]
    assert all(r.timings["spec_steps"] >= 1 for r in replies["mtp"])


def test_speculative_fills_the_cache_exactly(ckpt):
    """max_tokens clamped to the cache (max_seq_len): the last steps carry no draft row that
    would not fit, and the output is plain decoding's."""
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompt = [[(5 * i + 1) % 500 for i in range(7)]]
    plain = LLM(ckpt, quant="int8", max_seq_len=20).generate(prompt, params)[0]
    spec = LLM(ckpt, quant="int8", max_seq_len=20, speculative="mtp").generate(prompt, params)[0]
    assert spec.finish_reason == "length" and len(spec.token_ids) == 20 - 7 + 1
    assert spec.token_ids == plain.token_ids


def test_speculative_sampling_runs_and_is_seeded(ckpt):
    """Sampling through the rejection rule: a seeded request gives the same ids twice and
    every id is in the vocabulary (the distribution itself: tests/runtime/test_speculative_rule.py)."""
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True, seed=3)
    llm = LLM(ckpt, quant="int8", speculative="mtp")
    a = llm.generate([[1, 2, 3], [4, 5]], params)
    b = llm.generate([[1, 2, 3], [4, 5]], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == 24 and all(0 <= t < 512 for t in c.token_ids) for c in a)
    assert all(c.timings["draft_tokens"] >= 10 for c in a)  # ~16 here: sampled drafts are sometimes accepted
