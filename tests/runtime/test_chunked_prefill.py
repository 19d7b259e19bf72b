"""Chunked prefill (``EngineCore.step`` / ``prefill`` with ``chunk_tokens``, the engines'
``prefill_chunk``): a step of more than N rows runs as sub-steps of at most N rows.

* Exactness, chunked vs one step (same prompts, logits of every prompt row, then two
  decode steps, and the caches), measured on the tiny random ``mini`` / ``qwen3-mini``
  checkpoints (table in ``docs/runtime.md``, "Chunked prefill"):

  - bitwise with ``--quant int8`` (DeepSeek-V4 and Qwen3, fused) for every chunk size
    tried, 1 … 100 rows, within and across ``ROW_INVARIANT_ROWS`` (64): every GEMM is
    INT8 with per-token activations (exact per row), attention sums in each query's own
    order, and the router's float GEMM runs per row in <= 64-row calls (it is batched
    above; no difference was seen here);
  - float32 (reference and fused): within the fp32 bound of ``helpers``
    (``FP32_LOGIT_ULPS`` units of ``eps · max|logit|``, the bound the conformance tests
    use for chunked / batched steps): GEMM blocking depends on the row count; observed
    <= 9 units;
  - bf16 with float weights: the fused kernels pick the GEMM path by row count (bf16
    GEMV up to 16 rows, oneDNN above; within one bf16 ulp per op), so a sub-step of few
    rows rounds differently, and a one-ulp router logit can flip an expert on a random
    model (observed with 1-row chunks: max abs 1.44, row cosine 0.88). No general bound
    exists; the test pins chunks of 7 and 100 rows at row cosine >= 0.9999 (observed
    0.99998; chunks of 16 … 128 rows are bitwise here).
* The head runs only on rows somebody asked for: ``logits_rows="last"`` computes one head
  row per sequence in all, in the sub-step holding that row.
* The error contract: a failed chunked prefill registers nothing; a failed chunked step on
  empty sequences leaves them empty; a failed chunked step on non-empty sequences
  leaves them as they were (``_save_state``: DeepSeek-V4 every layer's cache snapshot,
  Qwen3 lengths and pages). A capacity overflow is raised before the first sub-step.
"""

from __future__ import annotations

import pytest
import torch

from helpers import BF16_MIN_COSINE, FP32_LOGIT_ULPS, assert_close_fp32, cosine
from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.errors import CacheOverflowError
from llm_kernels.runtime.engine_core import DEFAULT_PREFILL_CHUNK, check_chunk_tokens, plan_chunks

BF16, F32 = torch.bfloat16, torch.float32
LENS = (150, 70)  # 220 rows: past the sliding window (128), one ratio-128 entry, top-k binding


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    return {name: write_random_checkpoint(models.preset(name, num_hidden_layers=layers), root / name, seed=5,
                                          dtype=BF16, progress=False)
            for name, layers in (("mini", 4), ("qwen3-mini", 2))}


_ENGINES: dict = {}


def _engine(ckpts, name, backend, quant, dtype, max_seq_len=256):
    key = (name, backend, quant, dtype, max_seq_len)
    if key not in _ENGINES:
        cfg, w = load_checkpoint(ckpts[name], dtype=dtype, quant=quant, progress=False)
        _ENGINES[key] = models.spec_for_config(cfg).make_engine(w, cfg, dtype=dtype, max_seq_len=max_seq_len,
                                                                backend=backend, max_batch=4)
    return _ENGINES[key]


def _prompts(lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]


def _run(eng, prompts, chunk):
    """Logits of every prompt row, then of two decode steps (one token, then three)."""
    sids, lg = eng.prefill(prompts, chunk_tokens=chunk)
    try:
        d1 = eng.decode(sids, [int(x[-1].argmax()) for x in lg])
        d2 = eng.decode(sids, [[1, 2, 3]] * len(sids))
        return torch.cat([torch.cat(lg), torch.cat(d1), torch.cat(d2)])
    finally:
        for s in sids:
            eng.release(s)


# ---------------------------------------------------------------------------- the plan
def test_plan_chunks_covers_every_row_in_order():
    assert plan_chunks([5], 2) == [[(0, 0, 2)], [(0, 2, 4)], [(0, 4, 5)]]
    assert plan_chunks([3, 4], 4) == [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4)]]
    assert plan_chunks([3, 4], 7) == [[(0, 0, 3), (1, 0, 4)]]
    for lens in ([1], [7, 1, 9], [150, 70], [64, 64, 1]):
        for n in (1, 3, 16, 64, 500):
            plan = plan_chunks(lens, n)
            assert all(0 < sum(hi - lo for _, lo, hi in sub) <= n for sub in plan)
            assert all(len({b for b, _, _ in sub}) == len(sub) for sub in plan)
            seen = {b: 0 for b in range(len(lens))}
            for sub in plan:
                for b, lo, hi in sub:
                    assert lo == seen[b] and hi > lo
                    seen[b] = hi
            assert list(seen.values()) == list(lens)
            assert len(plan) == -(-sum(lens) // n)  # as few sub-steps as the rows allow


def test_chunk_size_values(ckpts):
    assert check_chunk_tokens(None) is None and check_chunk_tokens(0) is None and check_chunk_tokens(7) == 7
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="prefill_chunk"):
            check_chunk_tokens(bad)
    eng = _engine(ckpts, "qwen3-mini", "reference", None, F32)
    assert eng.prefill_chunk == DEFAULT_PREFILL_CHUNK
    with pytest.raises(ValueError, match="prefill_chunk"):
        eng.prefill_chunk = -3
    with pytest.raises(ValueError, match="chunk_tokens"):
        eng.prefill([[1, 2, 3]], chunk_tokens=-1)
    assert eng.prefill_chunk == DEFAULT_PREFILL_CHUNK


# ---------------------------------------------------------------------------- exactness
# (model, backend, quant, dtype, chunk sizes): chunked == one step bit for bit
BITWISE = [
    ("mini", "fused", "int8", BF16, (1, 7, 16, 64, 65, 100)),
    ("qwen3-mini", "fused", "int8", BF16, (1, 7, 16, 64, 65, 100)),
]


@pytest.mark.parametrize("name, backend, quant, dtype, chunks", BITWISE, ids=lambda v: str(v))
def test_chunked_prefill_is_bitwise_with_int8(ckpts, name, backend, quant, dtype, chunks):
    eng = _engine(ckpts, name, backend, quant, dtype)
    whole = _run(eng, _prompts(), 0)
    for n in chunks:
        out = _run(eng, _prompts(), n)
        assert torch.equal(out, whole), f"chunk {n}: max abs {(out - whole).abs().max().item():.3e}"


def test_chunked_prefill_leaves_the_same_deepseek_caches(ckpts):
    """Every cache component of both sequences (window rows, compressor / indexer buffers,
    overlap halves, entries, INT8 keys) after a chunked prefill equals the one-step one."""
    eng = _engine(ckpts, "mini", "fused", "int8", BF16)
    sa, _ = eng.prefill(_prompts(), chunk_tokens=0)
    sb, _ = eng.prefill(_prompts(), chunk_tokens=48)
    try:
        for a, b in zip(sa, sb):
            x, y = eng.seqs[a], eng.seqs[b]
            assert x.length == y.length and x.token_ids == y.token_ids
            for li, (p, q) in enumerate(zip(x.layers, y.layers)):
                assert p.window.end == q.window.end and torch.equal(p.window.rows, q.window.rows), li
                for part in ("compressor", "indexer"):
                    u, v = getattr(p, part), getattr(q, part)
                    if u is None:
                        continue
                    assert u.n_entries == v.n_entries and torch.equal(u.valid_entries(), v.valid_entries())
                    assert torch.equal(u.buf_kv, v.buf_kv) and torch.equal(u.buf_score, v.buf_score)
                    assert all(torch.equal(i, j) for i, j in zip(u.valid_int8_keys(), v.valid_int8_keys()))
    finally:
        for s in sa + sb:
            eng.release(s)


# float weights: the GEMMs' blocking depends on the row count (bounded, not bitwise)
FLOAT = [
    ("mini", "reference", None, F32),
    ("qwen3-mini", "reference", None, F32),
    ("mini", "fused", None, BF16),
    ("qwen3-mini", "fused", None, BF16),
]


@pytest.mark.parametrize("name, backend, quant, dtype", FLOAT, ids=lambda v: str(v))
def test_chunked_prefill_float_is_bounded(ckpts, name, backend, quant, dtype):
    eng = _engine(ckpts, name, backend, quant, dtype)
    whole = _run(eng, _prompts(), 0)
    for n in (7, 100):
        out = _run(eng, _prompts(), n)
        if dtype == F32:
            assert_close_fp32(out, whole, f"{name} {backend} chunk {n}", ulps=FP32_LOGIT_ULPS)
        else:
            rows = [cosine(a, b) for a, b in zip(out, whole)]
            assert min(rows) >= BF16_MIN_COSINE, f"{name} {backend} chunk {n}: min row cosine {min(rows):.6f}"


# ---------------------------------------------------------------------------- head rows
def _count_head_rows(eng):
    calls = []
    orig = eng._lm_head

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return orig(x, *a, **k)

    eng._lm_head = counting
    return calls


@pytest.mark.parametrize("name", ["mini", "qwen3-mini"])
def test_last_computes_one_head_row_per_sequence(ckpts, name):
    eng = _engine(ckpts, name, "fused", "int8", BF16)
    calls = _count_head_rows(eng)
    try:
        sids = [eng.add_sequence(), eng.add_sequence()]
        last = eng.step(sids, _prompts(), logits_rows="last", chunk_tokens=64)  # 4 sub-steps
        # sequence 0 ends in sub-step 3 (rows 128..191), sequence 1 in sub-step 4
        assert calls == [1, 1] and [t.shape[0] for t in last] == [1, 1]
        for s in sids:
            eng.release(s)
        calls.clear()
        sids, full = eng.prefill(_prompts(), chunk_tokens=64)
        assert calls == [64, 64, 64, 28] and [t.shape[0] for t in full] == list(LENS)
        for a, b in zip(last, full):
            assert torch.equal(a[0], b[-1])
        for s in sids:
            eng.release(s)
    finally:
        del eng._lm_head


# ---------------------------------------------------------------------------- errors
class _Boom(RuntimeError):
    pass


def _fail_on_forward(eng, n):
    """Make the engine's ``n``-th ``_forward`` call from now raise; returns the call log."""
    calls = []
    orig = eng._forward

    def forward(*a, **k):
        calls.append(sum(a[3]))
        if len(calls) == n:
            raise _Boom(f"forward call {n}")
        return orig(*a, **k)

    eng._forward = forward
    return calls


@pytest.mark.parametrize("name", ["mini", "qwen3-mini"])
def test_failed_chunked_prefill_registers_nothing(ckpts, name):
    eng = _engine(ckpts, name, "fused", "int8", BF16)
    want = _run(eng, _prompts(), 0)
    before = eng._next_id
    calls = _fail_on_forward(eng, 3)
    try:
        with pytest.raises(_Boom):
            eng.prefill(_prompts(), chunk_tokens=64)
        assert calls == [64, 64, 64]
        for sid in range(before, eng._next_id):
            with pytest.raises(KeyError):
                eng.length(sid)
        # fresh sequences of a failed step stay registered and empty
        calls.clear()
        sids = [eng.add_sequence(), eng.add_sequence()]
        with pytest.raises(_Boom):
            eng.step(sids, _prompts(), logits_rows="last", chunk_tokens=64)
        assert [eng.length(s) for s in sids] == [0, 0]
    finally:
        del eng._forward
    # the engine and those sequences work exactly as before
    out = eng.step(sids, _prompts(), chunk_tokens=64)
    d1 = eng.decode(sids, [int(x[-1].argmax()) for x in out])
    d2 = eng.decode(sids, [[1, 2, 3]] * 2)
    for s in sids:
        eng.release(s)
    assert torch.equal(torch.cat([torch.cat(out), torch.cat(d1), torch.cat(d2)]), want)
    if name == "qwen3-mini":
        assert eng.cache.free_blocks == eng.cache.num_blocks


@pytest.mark.parametrize("name", ["mini", "qwen3-mini"])
def test_failed_chunked_step_on_held_sequences_changes_nothing(ckpts, name):
    """``_save_state`` (DeepSeek-V4: every layer's cache snapshot; Qwen3: lengths and
    pages): a chunked step on non-empty sequences that fails in its second sub-step leaves
    every cache component as it was, and the same step then gives the one-step prefill's
    logits bitwise."""
    eng = _engine(ckpts, name, "fused", "int8", BF16)
    qwen = name == "qwen3-mini"
    free = eng.cache.free_blocks if qwen else None
    p = _prompts()
    sids, _ = eng.prefill([p[0][:20], p[1][:5]], chunk_tokens=0)
    before = eng.cache.free_blocks if qwen else [_cache_state(eng.seqs[s]) for s in sids]
    calls = _fail_on_forward(eng, 2)
    try:
        with pytest.raises(_Boom):
            eng.step(sids, [p[0][20:], p[1][5:]], chunk_tokens=64)
        assert calls == [64, 64]
    finally:
        del eng._forward
    assert [eng.length(s) for s in sids] == [20, 5]
    assert (eng.cache.free_blocks if qwen else [_cache_state(eng.seqs[s]) for s in sids]) == before
    out = eng.step(sids, [p[0][20:], p[1][5:]], chunk_tokens=64)  # now it goes through, chunked
    ref, full = eng.prefill(p, chunk_tokens=0)
    for a, b, n in zip(out, full, (20, 5)):
        assert torch.equal(a, b[n:])
    for s in sids + ref:
        eng.release(s)
    if qwen:
        assert eng.cache.free_blocks == free


def _cache_state(c):
    """Comparable bytes of a DeepSeek-V4 sequence cache (valid parts only)."""
    out = [c.length, tuple(c.token_ids)]
    for lc in c.layers:
        out += [lc.window.end, lc.window.rows.numpy().tobytes()]
        for st in (lc.compressor, lc.indexer):
            if st is not None:
                out += [st.n_entries, st.valid_entries().numpy().tobytes(), st.buf_kv.numpy().tobytes(),
                        st.buf_score.numpy().tobytes(),
                        None if st.prev_kv is None else st.prev_kv.numpy().tobytes()]
                out += [k.numpy().tobytes() for k in st.valid_int8_keys()]
    return out


@pytest.mark.parametrize("name", ["mini", "qwen3-mini"])
def test_overflow_is_raised_before_the_first_chunk(ckpts, name):
    eng = _engine(ckpts, name, "reference", None, F32, max_seq_len=64)
    before = eng._next_id
    calls = _fail_on_forward(eng, 99)
    try:
        with pytest.raises(CacheOverflowError, match="max_seq_len"):
            eng.prefill([list(range(10)), list(range(70))], chunk_tokens=16)
    finally:
        del eng._forward
    assert calls == []
    for sid in range(before, eng._next_id):
        with pytest.raises(KeyError):
            eng.length(sid)


def test_on_chunk_sees_every_sub_step(ckpts):
    eng = _engine(ckpts, "mini", "fused", "int8", BF16)
    seen = []
    sids = [eng.add_sequence(), eng.add_sequence()]
    eng.step(sids, [list(range(1, 11)), list(range(20, 27))], logits_rows="last", chunk_tokens=8,
             on_chunk=lambda s, t: seen.append((s, t, eng.last_hidden.shape[0])))
    assert seen == [([sids[0]], [list(range(1, 9))], 8),
                    ([sids[0], sids[1]], [[9, 10], list(range(20, 26))], 8),
                    ([sids[1]], [[26]], 1)]
    for s in sids:
        eng.release(s)


# ---------------------------------------------------------------------------- users
def test_llm_generate_and_speculative_with_chunked_prefill(tmp_path_factory):
    """``LLM(prefill_chunk=N)``: greedy output equals the one-step prefill's (fused int8:
    bitwise logits), also with speculative decoding, whose MTP block then reads the
    prompt's hidden rows from every sub-step."""
    from llm_kernels import LLM, SamplingParams

    path = write_random_checkpoint(models.preset("mini", mtp_layers=1), tmp_path_factory.mktemp("mtp") / "m",
                                   seed=0, dtype=BF16, progress=False)
    prompts = _prompts((90, 41), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    whole = LLM(path, quant="int8", max_seq_len=160, max_batch=2, prefill_chunk=0)
    want = [o.token_ids for o in whole.generate(prompts, params)]
    whole.engine.prefill_chunk = 32
    assert [o.token_ids for o in whole.generate(prompts, params)] == want
    spec = LLM(path, quant="int8", max_seq_len=160, max_batch=2, prefill_chunk=32, speculative="mtp")
    assert spec.engine.prefill_chunk == 32
    outs = spec.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert all(o.timings["acceptance_rate"] >= 0 for o in outs)
    with pytest.raises(ValueError, match="prefill_chunk"):
        LLM(path, quant="int8", prefill_chunk=-1)


def test_bench_ub_flag(ckpts, tmp_path, capsys):
    import json

    from llm_kernels.bench import driver

    path = tmp_path / "b.json"
    rc = driver.main(["--checkpoint", str(ckpts["qwen3-mini"]), "-p", "40", "-n", "2", "-d", "0,30", "-ub", "16,0",
                      "--backend", "reference", "--dtype", "float32", "-r", "1", "--warmup", "0",
                      "--bw-bytes", "64M", "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(path.read_text())
    assert d["n_ubatch"] == [16, 0]
    assert [(t["test"], t["n_ubatch"]) for t in d["tests"]] == [
        ("pp40", 16), ("pp40", 0), ("pp40 @ d30", 16), ("pp40 @ d30", 0),
        ("tg2", 16), ("tg2", 0), ("tg2 @ d30", 16), ("tg2 @ d30", 0)]
    assert all(len(t["setup_s"]) == 1 for t in d["tests"])
    assert "n_ubatch" in out and "whole" in out


def test_cli_flags_parse():
    from llm_kernels.cli import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "-ub", "64"]).prefill_chunk == 64
    assert p.parse_args(["generate", "--prefill-chunk", "0"]).prefill_chunk == 0
    assert p.parse_args(["generate"]).prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert p.parse_args(["logits", "--checkpoint", "x", "--input-ids", "1", "--out", "o",
                         "--ubatch-size", "8"]).prefill_chunk == 8
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "-ub", "-2"])
