"""Qwen3 conformance against transformers' ``Qwen3ForCausalLM`` on five small random
configs (``zoo.Q3_CASES``: GQA, MHA + tied embeddings, MQA + YaRN, scaled
weights, odd dims).

* stateless reference ``forward`` vs transformers: fp32 (eager and sdpa) and bf16 (eager);
* the paged runtime (``Qwen3Engine``, reference and fused backends): prefill then one-token
  decode steps vs transformers' cached decode; a ragged batch of three sequences crossing
  page boundaries, with steps where only some sequences advance; multi-token steps; decode
  == re-prefill; W8A8 engine vs the W8A8 stateless golden.

Tolerances (see ``helpers``): fp32 ``192 · eps32 · max|logit|``; bf16 cosine >= 0.9999.
"""

from __future__ import annotations

import pytest
import torch

from helpers import Q3_CASE_NAMES, assert_close_fp32, cosine, hf_cached_run, hf_logits, q3_ids
from llm_kernels.reference.qwen3 import model
from llm_kernels.runtime.qwen3.stages import stages
from llm_kernels.runtime.qwen3.engine import Qwen3Engine

T_PROMPT = 160
BF16_MIN_COSINE = 0.9999


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", Q3_CASE_NAMES)
def test_forward_fp32_matches_transformers(qwen3_zoo, name, attn):
    """fp32 logits of the stateless reference on a 160-token prompt (observed: 0.0 vs
    eager, i.e. bit-exact; <= ~1e-6 vs sdpa)."""
    cfg, w = qwen3_zoo.ours(name, torch.float32)
    ids = q3_ids(qwen3_zoo.case(name), T_PROMPT)
    ours = model.forward(w, cfg, ids, torch.float32)
    ref = hf_logits(qwen3_zoo.hf(name, torch.float32, attn), ids)
    assert_close_fp32(ours, ref, f"{name}/{attn} fp32 logits")


@pytest.mark.parametrize("name", Q3_CASE_NAMES)
def test_forward_bf16_matches_transformers(qwen3_zoo, name):
    """bf16: the reference rounds where transformers' bf16 eager path does (observed
    bit-exact); asserted: every row's cosine >= 0.9999."""
    cfg, w = qwen3_zoo.ours(name, torch.bfloat16)
    ids = q3_ids(qwen3_zoo.case(name), T_PROMPT)
    ours = model.forward(w, cfg, ids, torch.bfloat16)
    ref = hf_logits(qwen3_zoo.hf(name, torch.bfloat16, "eager"), ids)
    rows = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
    assert rows.min().item() >= BF16_MIN_COSINE, f"{name}: worst row cosine {rows.min().item():.6f}"


def _engine(qwen3_zoo, name, dtype, backend="reference", quant=None, block_size=16, max_seq_len=512, **kw):
    cfg, w = qwen3_zoo.ours(name, dtype, quant)
    return Qwen3Engine(w, cfg, dtype=dtype, max_seq_len=max_seq_len, block_size=block_size,
                       ops=stages(backend), **kw)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", ["mini", "yarn_mqa", "odd"])
def test_engine_decode_matches_transformers_cached(qwen3_zoo, name, backend):
    """Prefill 40 tokens, then 60 one-token decode steps, every step vs transformers'
    DynamicCache decode (fp32). Block size 16: pages fill and new ones are taken."""
    case = qwen3_zoo.case(name)
    ids = q3_ids(case, 100, salt=7)
    hf = hf_cached_run(qwen3_zoo.hf(name, torch.float32), ids, [40] + [1] * 60)
    eng = _engine(qwen3_zoo, name, torch.float32, backend)
    (sid,), (lg,) = eng.prefill([ids[:40].tolist()])
    assert_close_fp32(lg, hf[0], f"{name}/{backend} prefill")
    for i in range(60):
        (lg,) = eng.decode([sid], [int(ids[40 + i])])
        assert_close_fp32(lg, hf[1 + i], f"{name}/{backend} decode step {i}")


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_engine_ragged_batch_matches_transformers(qwen3_zoo, backend):
    """Three sequences of 5, 37 and 64 prompt tokens prefilled in ONE step (block size 8:
    ragged page counts), then 12 steps where sequence 1 pauses on odd steps and sequence 2
    feeds 3 tokens at a time. Each sequence vs transformers run alone."""
    name = "mini"
    case = qwen3_zoo.case(name)
    m = qwen3_zoo.hf(name, torch.float32)
    prompts = [q3_ids(case, n, salt=20 + n) for n in (5, 37, 64)]
    eng = _engine(qwen3_zoo, name, torch.float32, backend, block_size=8)
    sids, pre = eng.prefill([p.tolist() for p in prompts])
    fed = [list(p.tolist()) for p in prompts]
    outs = [[pre[b]] for b in range(3)]
    extra = q3_ids(case, 80, salt=99).tolist()
    k = 0
    for step in range(12):
        live, toks = [], []
        for b in range(3):
            if b == 1 and step % 2:
                continue
            n = 3 if b == 2 else 1
            live.append(b)
            toks.append(extra[k:k + n])
            k += n
        res = eng.step([sids[b] for b in live], toks)
        for b, t, r in zip(live, toks, res):
            fed[b].extend(t)
            outs[b].append(r)
    for b in range(3):
        ours = torch.cat(outs[b])
        ref = hf_logits(m, torch.tensor(fed[b]))
        assert_close_fp32(ours, ref, f"{backend} sequence {b} ({len(fed[b])} tokens)")
        assert eng.length(sids[b]) == len(fed[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_decode_equals_reprefill(qwen3_zoo, backend, dtype):
    """Decode logits after 30 + 50 steps equal the stateless forward of the whole sequence
    (fp32: 192-ulp bound; bf16: row cosine >= 0.9999, since a GEMM over 1 row and over
    80 rows may round differently)."""
    name = "tied_mha"
    case = qwen3_zoo.case(name)
    ids = q3_ids(case, 80, salt=3)
    eng = _engine(qwen3_zoo, name, dtype, backend)
    (sid,), (lg,) = eng.prefill([ids[:30].tolist()])
    outs = [lg]
    for t in ids[30:].tolist():
        outs.append(eng.decode([sid], [t])[0])
    ours = torch.cat(outs)
    cfg, w = qwen3_zoo.ours(name, dtype)
    ref = model.forward(w, cfg, ids, dtype)
    if dtype == torch.float32:
        assert_close_fp32(ours, ref, f"{backend} decode vs re-prefill")
    else:
        rows = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
        assert rows.min().item() >= BF16_MIN_COSINE, f"worst row cosine {rows.min().item():.6f}"


def test_multi_token_steps_match_single_steps(qwen3_zoo):
    """Chunks of 7, 3, 1, 5 tokens through the cache equal the stateless forward (fp32)."""
    name = "odd"
    ids = q3_ids(qwen3_zoo.case(name), 96, salt=5)
    eng = _engine(qwen3_zoo, name, torch.float32, block_size=5)
    (sid,), (lg,) = eng.prefill([ids[:10].tolist()])
    outs, pos, sizes, i = [lg], 10, [7, 3, 1, 5], 0
    while pos < 96:
        n = min(sizes[i % 4], 96 - pos)
        outs.append(eng.step([sid], [ids[pos:pos + n].tolist()])[0])
        pos += n
        i += 1
    cfg, w = qwen3_zoo.ours(name, torch.float32)
    assert_close_fp32(torch.cat(outs), model.forward(w, cfg, ids, torch.float32), "multi-token steps")


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_w8a8_engine_matches_w8a8_golden(qwen3_zoo, backend):
    """W8A8 (INT8 projections, bf16 activations) engine decode vs the stateless W8A8 golden
    forward on the same weights: the same quantised inputs give the same INT32 sums, so
    the only differences are bf16 roundings of 1-row vs many-row GEMMs and of the fused
    attention (fp32 inside, one rounding): row cosine >= 0.999. And W8A8 vs bf16 (the
    quantisation error itself): cosine >= 0.99 on the mini model."""
    name = "mini"
    ids = q3_ids(qwen3_zoo.case(name), 48, salt=11)
    eng = _engine(qwen3_zoo, name, torch.bfloat16, backend, quant="w8a8")
    (sid,), (lg,) = eng.prefill([ids[:24].tolist()])
    outs = [lg] + [eng.decode([sid], [t])[0] for t in ids[24:].tolist()]
    ours = torch.cat(outs)
    cfg, wq = qwen3_zoo.ours(name, torch.bfloat16, "w8a8")
    golden = model.forward(wq, cfg, ids, torch.bfloat16)
    rows = torch.nn.functional.cosine_similarity(ours.double(), golden.double(), dim=-1)
    assert rows.min().item() >= 0.999, f"worst row cosine {rows.min().item():.6f}"
    _, wf = qwen3_zoo.ours(name, torch.bfloat16)
    assert cosine(golden, model.forward(wf, cfg, ids, torch.bfloat16)) >= 0.99


def test_engine_errors_leave_cache_unchanged(qwen3_zoo):
    """Capacity, unknown id, vocab and shape errors are raised before anything changes."""
    from llm_kernels.errors import CacheOverflowError

    eng = _engine(qwen3_zoo, "mini", torch.float32, max_seq_len=20, block_size=8, num_blocks=5)
    (a,), _ = eng.prefill([list(range(15))])
    with pytest.raises(CacheOverflowError, match="max_seq_len=20"):
        eng.step([a], [list(range(6))])
    assert eng.length(a) == 15
    (b,), _ = eng.prefill([list(range(9))])  # 2 pages for a, 2 for b: 1 left
    with pytest.raises(CacheOverflowError, match="pages"):
        eng.prefill([list(range(17))])
    assert eng.cache.free_blocks == 1
    with pytest.raises(KeyError, match="unknown sequence id 99"):
        eng.decode([99], [1])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        eng.decode([a], [512])
    with pytest.raises(ValueError, match="once per step"):
        eng.step([a, a], [[1], [2]])
    assert eng.length(a) == 15 and eng.length(b) == 9
    eng.release(b)
    assert eng.cache.free_blocks == 3
    eng.decode([a], [3])
    assert eng.length(a) == 16
