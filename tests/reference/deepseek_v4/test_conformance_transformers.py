"""Whole-model conformance against Hugging Face ``transformers``' ``DeepseekV4ForCausalLM``.

Four small random configs (``helpers.CASES``): ``mini`` (the preset), ``wide`` (other dims,
hc_mult 3, binding indexer top-k, 6 experts top-3 with sigmoid scoring, two hash layers,
HCA first, own YaRN), ``scaled`` (mini written with ``weight_scale=2``) and ``swa32``
(sliding window 32, CSA first). Every config has CSA (ratio 4), HCA (ratio 128), SWA and
hash-routed MoE layers.

Checked here:
* our stateless reference ``model.forward`` vs transformers, fp32 and bf16, 300 tokens
  (bf16 against transformers' default ``grouped_mm`` experts backend, bit-exact, and
  against the eager backend, which rounds the top-k expert sum differently: see
  ``test_forward_bf16_vs_eager_experts_backend``);
* the cached runtime (``DeepSeekV4Engine``): prefill + 300 one-token decode steps vs
  transformers' cached decode (both compressors emit, the window wraps), decode vs a
  full re-prefill, multi-token steps vs one-token steps, a batch of two sequences of
  different lengths (incl. steps where only one advances);
* hash routing: ``tid2eid`` is read by both implementations;
* (``-m slow``) 1000 decode steps on two variants with a non-binding indexer top-k.

fp32 tolerance: ``helpers.FP32_LOGIT_ULPS · eps32 · max|logit|`` (= 192 · 1.19e-7 · ~5 ≈
1.1e-4); worst observed 17.7 · eps32 · max|logit| (9.1e-6), see ``helpers``. Observed
errors are listed per test.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (
    BF16_MIN_COSINE,
    CASE_NAMES,
    EPS32,
    assert_close_fp32,
    cosine,
    fp32_atol,
    gcd_chunks,
    hf_cached_run,
    hf_logits,
    max_abs,
    token_ids,
)
from llm_kernels.models.deepseek_v4.config import SLIDING
from llm_kernels.reference.deepseek_v4 import model
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine

T_PROMPT = 300


def _ids(zoo, name: str, n: int, salt: int = 100) -> torch.Tensor:
    c = zoo.case(name)
    return token_ids(c.cfg, n, seed=c.seed + salt)


# ============================================================ stateless whole-prompt forward
@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_fp32_matches_transformers(zoo, name):
    """fp32 logits of ``model.forward`` on a 300-token prompt vs transformers.

    Observed max abs: mini 0, wide 2.9e-6 (≈ 5 · eps32 · max|logit| 4.7), scaled 0,
    swa32 0. Bound: 192 · eps32 · max|logit| ≈ 1.1e-4."""
    cfg, w = zoo.ours(name, torch.float32)
    ids = _ids(zoo, name, T_PROMPT)
    ours = model.forward(w, cfg, ids, dtype=torch.float32)
    ref = hf_logits(zoo.hf(name, torch.float32), ids)
    err = assert_close_fp32(ours, ref, f"{name} fp32 forward")
    print(f"{name}: fp32 forward max abs {err:.3g} ({err / (EPS32 * ref.abs().max().item()):.1f} eps·max|ref|), "
          f"max|logit| {ref.abs().max().item():.3g}")
    # the comparison is not vacuous: logits vary across positions and vocabulary
    assert ref.std(dim=-1).min() > 0.1


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_bf16_matches_transformers(zoo, name):
    """bf16 logits (``load_checkpoint(dtype=bf16)``, ``forward(dtype=bf16)``) vs
    ``from_pretrained(dtype=bf16)`` with its default experts backend (``grouped_mm``), whose
    routed-expert combine (each weighted expert output rounded, the top-k summed in fp32,
    rounded once; = spec §10.2) is the one our reference implements. Bound: cosine >= 0.9999."""
    cfg, w = zoo.ours(name, torch.bfloat16)
    ids = _ids(zoo, name, T_PROMPT)
    ours = model.forward(w, cfg, ids, dtype=torch.bfloat16)
    ref = hf_logits(zoo.hf(name, torch.bfloat16), ids)
    cos = cosine(ours, ref)
    print(f"{name}: bf16 forward vs transformers(default experts) cosine {cos:.8f} max abs {max_abs(ours, ref):.3g}")
    assert torch.isfinite(ours).all()
    assert cos >= BF16_MIN_COSINE, f"{name}: bf16 cosine {cos:.8f} < {BF16_MIN_COSINE}"


# transformers' *eager* experts backend (and DeepSeek's reference ``MoE``) adds the
# weighted expert outputs one expert at a time in the model dtype, while the default
# ``grouped_mm`` backend and our reference sum the top-k of a token in fp32 and round once.
# With top-2 routing both orders round identically (a+b), so the mini-based configs stay
# bit-exact; with top-3 (``wide``) the sums differ by bf16 rounding, amplified through 4
# layers: observed cosine ~0.9985 (bf16 itself is only cosine ~0.998 from the fp32 logits
# on these random models, for either backend).
_EAGER_BACKEND_MIN_COS = {"mini": BF16_MIN_COSINE, "scaled": BF16_MIN_COSINE,
                            "swa32": BF16_MIN_COSINE, "wide": 0.995}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_bf16_vs_eager_experts_backend(zoo, name):
    cfg, w = zoo.ours(name, torch.bfloat16)
    ids = _ids(zoo, name, T_PROMPT)
    ours = model.forward(w, cfg, ids, dtype=torch.bfloat16)
    ref = hf_logits(zoo.hf(name, torch.bfloat16, experts="eager"), ids)
    cos = cosine(ours, ref)
    print(f"{name}: bf16 forward vs transformers(eager experts backend) cosine {cos:.8f} "
          f"max abs {max_abs(ours, ref):.3g}")
    bound = _EAGER_BACKEND_MIN_COS[name]
    if cfg.num_experts_per_tok <= 2:
        assert bound == BF16_MIN_COSINE
    assert cos >= bound, f"{name}: bf16 cosine {cos:.8f} < {bound}"


# ============================================================ cached runtime
def _engine(zoo, name: str, max_seq_len: int) -> DeepSeekV4Engine:
    cfg, w = zoo.ours(name, torch.float32)
    return DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=max_seq_len)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_engine_300_decode_steps_match_transformers_cached_decode(zoo, name):
    """Prefill P=10, then 300 single-token decode steps (positions 10..309): the ratio-4
    compressors emit every 4 tokens, the ratio-128 compressor at positions 127 and 255,
    and the sliding window (128, or 32 for swa32) wraps. Every step's logits vs
    transformers' cached decode ``m(ids[P+i:P+i+1], cache=pkv)``.

    Observed worst step (incl. prefill): mini 2.6e-6, wide 3.0e-6, scaled 4.4e-6 (14 eps·max|logit|),
    swa32 3.3e-6. Runtime ~3 s per config, so all four run by default."""
    P, N = 10, 300
    cfg, _ = zoo.ours(name)
    ids = _ids(zoo, name, P + N, salt=7)
    eng = _engine(zoo, name, max_seq_len=P + N)
    ref = hf_cached_run(zoo.hf(name, torch.float32), ids, [P] + [1] * N)

    (sid,), (pre,) = eng.prefill([ids[:P].tolist()])
    worst = assert_close_fp32(pre, ref[0], f"{name} prefill")
    for i in range(N):
        (out,) = eng.decode([sid], [int(ids[P + i])])
        assert out.shape == (1, cfg.vocab_size)
        worst = max(worst, assert_close_fp32(out, ref[1 + i], f"{name} decode step {i} (position {P + i})"))
    print(f"{name}: worst of prefill + {N} decode steps: {worst:.3g}")

    # The run really exercised what it is meant to: compressor emissions and window wrap.
    seq = eng.seqs[sid]
    assert seq.length == P + N and seq.token_ids == ids.tolist()
    for layer, lc in enumerate(seq.layers):
        assert lc.window.end == P + N and lc.window.rows.shape[0] == cfg.sliding_window - 1
        if cfg.layer_types[layer] != SLIDING:
            ratio = cfg.compress_ratio(layer)
            assert lc.compressor.n_entries == (P + N) // ratio >= 2
    assert P + N > cfg.sliding_window and P + N > 2 * 128


@pytest.mark.parametrize("name", CASE_NAMES)
def test_decode_equals_full_reprefill(zoo, name):
    """Engine prefill P=100 + 60 decode steps (crosses position 128 and wraps the window)
    vs (a) ``model.forward`` on all 160 tokens and (b) an engine prefill of all 160 tokens.
    Observed max abs (a) = (b): mini 3.7e-6, wide 3.6e-6, scaled 7.2e-6 (13 eps·max|logit|),
    swa32 6.2e-6; the engine's prefill equals ``model.forward`` bit for bit."""
    P, N = 100, 60
    cfg, w = zoo.ours(name)
    ids = _ids(zoo, name, P + N, salt=11)
    eng = _engine(zoo, name, max_seq_len=P + N)
    (sid,), (pre,) = eng.prefill([ids[:P].tolist()])
    rows = [pre] + [eng.decode([sid], [int(t)])[0] for t in ids[P:]]
    incremental = torch.cat(rows, dim=0)
    assert incremental.shape == (P + N, cfg.vocab_size)

    full = model.forward(w, cfg, ids, dtype=torch.float32)
    e1 = assert_close_fp32(incremental, full, f"{name}: prefill+decode vs model.forward")
    (_,), (re,) = _engine(zoo, name, max_seq_len=P + N).prefill([ids.tolist()])
    e2 = assert_close_fp32(incremental, re, f"{name}: prefill+decode vs engine re-prefill")
    e3 = assert_close_fp32(re, full, f"{name}: engine prefill vs model.forward")
    print(f"{name}: vs forward {e1:.3g}, vs re-prefill {e2:.3g}, re-prefill vs forward {e3:.3g}")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_multi_token_steps_equal_single_token_steps(zoo, name):
    """After a 7-token prefill, steps of 3 tokens (so steps straddle ratio-4 windows, the
    ratio-128 boundary at position 127 and the window wrap) vs one-token steps, and a mixed
    pattern of 1/2/3/5/8-token steps; all vs transformers' whole-sequence logits.
    Observed max abs: mini/wide/swa32 <= 4.4e-6, scaled <= 9.1e-6 (17.7 eps·max|logit|,
    the worst of the suite)."""
    P, total = 7, 7 + 3 * 45  # 142 tokens
    cfg, _ = zoo.ours(name)
    ids = _ids(zoo, name, total, salt=13)
    ref = hf_logits(zoo.hf(name, torch.float32), ids)

    def run(chunks):
        eng = _engine(zoo, name, max_seq_len=total)
        (sid,), (pre,) = eng.prefill([ids[:P].tolist()])
        rows, pos = [pre], P
        for n in chunks:
            (out,) = eng.step([sid], [ids[pos:pos + n].tolist()])
            assert out.shape == (n, cfg.vocab_size)
            rows.append(out)
            pos += n
        assert pos == total and eng.seqs[sid].length == total
        return torch.cat(rows, dim=0)

    single = run([1] * (total - P))
    triple = run([3] * ((total - P) // 3))
    mixed = run(gcd_chunks(total - P, [1, 2, 3, 5, 8]))
    e1 = assert_close_fp32(triple, single, f"{name}: 3-token steps vs 1-token steps")
    e2 = assert_close_fp32(mixed, single, f"{name}: mixed steps vs 1-token steps")
    e3 = assert_close_fp32(single, ref, f"{name}: 1-token steps vs transformers")
    e4 = assert_close_fp32(triple, ref, f"{name}: 3-token steps vs transformers")
    print(f"{name}: 3 vs 1 {e1:.3g}, mixed vs 1 {e2:.3g}, 1 vs hf {e3:.3g}, 3 vs hf {e4:.3g}")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_batch_of_two_sequences_matches_transformers_per_sequence(zoo, name):
    """Two sequences (prompts of 37 and 150 tokens) prefilled together, then steps feeding
    both, steps where only one advances (each in turn), and a step with the batch order
    reversed and several tokens per sequence. Every logits row vs transformers run on that
    sequence alone (whole-sequence forward). Observed max abs <= 3.6e-6 (scaled: 6.8e-6)."""
    cfg, _ = zoo.ours(name)
    a = _ids(zoo, name, 60, salt=17)
    b = _ids(zoo, name, 170, salt=19)
    eng = _engine(zoo, name, max_seq_len=256)
    got = {0: [], 1: []}
    pos = {0: 37, 1: 150}
    seqs = {0: a, 1: b}
    sids, outs = eng.prefill([a[:37].tolist(), b[:150].tolist()])
    got[0].append(outs[0])
    got[1].append(outs[1])

    def step(plan):  # plan: list of (which, n_tokens)
        toks = [seqs[k][pos[k]:pos[k] + n].tolist() for k, n in plan]
        res = eng.step([sids[k] for k, _ in plan], toks)
        for (k, n), r in zip(plan, res):
            assert r.shape == (n, cfg.vocab_size)
            got[k].append(r)
            pos[k] += n

    for _ in range(4):
        step([(0, 1), (1, 1)])
    for _ in range(3):
        step([(0, 1)])          # only the short sequence advances
    lengths_before = eng.seqs[sids[0]].length
    for _ in range(2):
        step([(1, 1)])          # only the long one
    assert eng.seqs[sids[0]].length == lengths_before
    step([(1, 2), (0, 3)])      # reversed batch order, several tokens each
    step([(0, 1), (1, 1)])
    assert pos[0] == 37 + 4 + 3 + 3 + 1 and pos[1] == 150 + 4 + 2 + 2 + 1
    m = zoo.hf(name, torch.float32)
    for k in (0, 1):
        ours = torch.cat(got[k], dim=0)
        ref = hf_logits(m, seqs[k][:pos[k]])
        err = assert_close_fp32(ours, ref, f"{name}: batched sequence {k} vs transformers alone")
        print(f"{name}: sequence {k} ({pos[k]} tokens) max abs {err:.3g}")
        assert eng.seqs[sids[k]].token_ids == seqs[k][:pos[k]].tolist()


@pytest.mark.parametrize("name", ["mini", "wide"])
def test_engine_bf16_decode_matches_transformers_cached_decode(zoo, name):
    """bf16 engine (prefill 10 + 190 one-token steps, crossing position 128 and the window
    wrap) vs transformers' bf16 cached decode (default experts backend, see
    ``test_forward_bf16_matches_transformers``).
    Bound: cosine >= 0.9999 per step."""
    P, N = 10, 190
    cfg, w = zoo.ours(name, torch.bfloat16)
    ids = _ids(zoo, name, P + N, salt=29)
    ref = hf_cached_run(zoo.hf(name, torch.bfloat16), ids, [P] + [1] * N)
    eng = DeepSeekV4Engine(w, cfg, torch.bfloat16, max_seq_len=P + N)
    (sid,), (pre,) = eng.prefill([ids[:P].tolist()])
    outs = [pre] + [eng.decode([sid], [int(t)])[0] for t in ids[P:]]
    worst_cos, worst_abs = 1.0, 0.0
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert torch.isfinite(o).all()
        c = cosine(o, r)
        worst_cos, worst_abs = min(worst_cos, c), max(worst_abs, max_abs(o, r))
        assert c >= BF16_MIN_COSINE, f"{name}: bf16 step {i} (position {P + i - 1 if i else 0}) cosine {c:.8f}"
    print(f"{name}: bf16 decode worst step cosine {worst_cos:.8f}, max abs {worst_abs:.3g}")


# ============================================================ hash routing
@pytest.mark.parametrize("name,layer", [("mini", 0), ("wide", 1)])
def test_hash_routing_table_is_used_by_both(zoo, name, layer):
    """Changing ``tid2eid`` of a hash layer (every expert id +1 mod E, rows stay distinct)
    changes our logits and transformers' logits, and the two still agree (fp32 bound)."""
    cfg, w = zoo.ours(name)
    assert cfg.is_hash_layer(layer)
    key = f"layers.{layer}.ffn.gate.tid2eid"
    ids = _ids(zoo, name, 64, salt=23)
    m = zoo.fresh_hf(name, torch.float32)
    router = m.model.layers[layer].mlp.gate
    assert hasattr(router, "tid2eid")
    assert torch.equal(router.tid2eid.long(), w[key].long()), "transformers loaded another tid2eid"

    base_ours = model.forward(w, cfg, ids)
    base_ref = hf_logits(m, ids)
    new_table = (w[key] + 1) % cfg.n_routed_experts
    w2 = dict(w)
    w2[key] = new_table
    router.tid2eid.copy_(new_table.to(router.tid2eid.dtype))
    mod_ours = model.forward(w2, cfg, ids)
    mod_ref = hf_logits(m, ids)

    d_ours, d_ref = max_abs(mod_ours, base_ours), max_abs(mod_ref, base_ref)
    print(f"{name} layer {layer}: logits change ours {d_ours:.3g}, transformers {d_ref:.3g}")
    assert d_ours > 1000 * fp32_atol(base_ours), "our logits ignore tid2eid"
    assert d_ref > 1000 * fp32_atol(base_ref), "transformers' logits ignore tid2eid"
    assert_close_fp32(mod_ours, mod_ref, f"{name}: modified tid2eid, ours vs transformers")
    assert_close_fp32(base_ours, base_ref, f"{name}: original tid2eid, ours vs transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mini_topk_all", "swa32_topk_all"])
def test_engine_long_decode_matches_transformers_cached_decode(zoo, name):
    """Long variant (slow, ~10 s each): prefill 50 + 1000 one-token steps (the ratio-128
    compressor emits 8 entries, the ratio-4 ones 262, the window wraps many times). Every
    step vs transformers' cached decode, fp32 bound.

    These configs set index_topk = 1024 (>= every entry count) so that the indexer never has
    to choose. With the binding top-16 of ``mini``, this run diverges at position 791 by
    0.027: the 16th and 17th best index scores are 4.2e-7 apart while the two
    implementations' scores differ by 1.4e-6 (fp32 noise of a legitimately different
    operation order), so one entry of the selected set flips, and the difference then
    propagates through the cached KV rows of that position. That is a property of the
    discrete top-k, not a defect; binding top-k selection is covered by the 300-step test
    above (no flip there for any config) and by the tie-aware stage test of the indexer."""
    P, N = 50, 1000
    ids = _ids(zoo, name, P + N, salt=37)
    eng = _engine(zoo, name, max_seq_len=P + N)
    ref = hf_cached_run(zoo.hf(name, torch.float32), ids, [P] + [1] * N)
    (sid,), (pre,) = eng.prefill([ids[:P].tolist()])
    worst = assert_close_fp32(pre, ref[0], f"{name} prefill")
    for i in range(N):
        (out,) = eng.decode([sid], [int(ids[P + i])])
        worst = max(worst, assert_close_fp32(out, ref[1 + i], f"{name} decode position {P + i}"))
    print(f"{name}: worst of prefill + {N} decode steps: {worst:.3g}")
