"""Per-stage conformance of the torch reference against the matching ``transformers``
DeepSeek-V4 submodules, on random inputs, with the weights of the test checkpoints
(``helpers.CASES``; the transformers modules come from ``from_pretrained`` of the same
checkpoint, so both sides hold identical parameters).

fp32 tolerance: ``STAGE_ULPS · eps32 · max|reference|`` with ``STAGE_ULPS = 12``. Observed
(345 of 356 comparisons bit-exact): the only non-zero errors are the MoE block / decoder
layer with top-3 routing (``wide``, transformers' default ``grouped_mm`` experts backend sums
the top-k expert outputs in another order), at most 1.07 units of ``eps32 · max|ref|``
(4.8e-7 on outputs of max ~6), so the bound is ~11x above the worst observation.
bf16 (where tested): observed bit-exact; bound one bf16 rounding unit (2^-8) of the output
scale.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config as HFConfig
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4CSACompressor,
    DeepseekV4HCACompressor,
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
    DeepseekV4Indexer,
    DeepseekV4RotaryEmbedding,
    DeepseekV4SparseMoeBlock,
    apply_rotary_pos_emb,
)

from helpers import CASE_NAMES, EPS32, max_abs, randn, token_ids
from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING
from llm_kernels.models import preset
from llm_kernels.harness import TopKTieAware
from llm_kernels.reference.deepseek_v4 import compressor as C
from llm_kernels.reference.deepseek_v4 import hc as HC
from llm_kernels.reference.deepseek_v4 import indexer as IX
from llm_kernels.reference.deepseek_v4 import model
from llm_kernels.reference.deepseek_v4 import moe as MOE
from llm_kernels.reference.deepseek_v4.common import apply_rope, rope_cos_sin
from llm_kernels.numerics.rope import rope_inv_freq
from llm_kernels.reference.deepseek_v4.qkv_proj_rope import qkv_proj_rope

F32, BF16 = torch.float32, torch.bfloat16
STAGE_ULPS = 12
BF16_UNIT = 2.0 ** -8  # bf16 rounding unit (8 significand bits)
STAGE_CASES = ["mini", "wide"]  # hc_mult 4 / 3, different dims, top-2 / top-3, hash layers in both
T = 301  # not a multiple of 4 or 128: the compressors must drop the open window


def assert_stage(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype=F32) -> float:
    """fp32: ``max|a-e| <= STAGE_ULPS·eps32·max|e|``; bf16: ``<= 2^-8·max|e|``."""
    expected = expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    scale = max(expected.abs().max().item(), 1e-30)
    tol = (STAGE_ULPS * EPS32 if dtype == F32 else BF16_UNIT) * scale
    err = max_abs(actual, expected)
    assert err <= tol, f"{what}: max abs {err:.3g} > {tol:.3g} (max|ref| {scale:.3g})"
    return err


def _setup(zoo, name, dtype=F32, experts=None):
    cfg, w = zoo.ours(name, dtype)
    return cfg, w, zoo.hf(name, dtype, experts=experts)


def _hc_kw(cfg):
    return dict(hc_mult=cfg.hc_mult, sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                rms_eps=cfg.rms_norm_eps)


def _hf_hc_post(post, comb, out, residual, dtype):
    """The expand + mix expression of ``DeepseekV4DecoderLayer.forward`` (transformers 5.23):
    ``post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1,-2) @ residual``."""
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
        comb.to(dtype).transpose(-1, -2), residual)


def _positions_embeddings(m, x, pos):
    return {p: m.model.rotary_emb(x, position_ids=pos[None], layer_type=p) for p in ("main", "compress")}


# ============================================================ hyper-connections
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", STAGE_CASES)
def test_hc_pre_matches_hyper_connection(zoo, name, dtype):
    """``hc_pre`` vs ``DeepseekV4HyperConnection`` (attn_hc and ffn_hc of every layer):
    post [T,HC], comb [T,HC,HC] (Sinkhorn output) and the collapsed input [T,D]. Inputs at
    two scales (1 and 20) so the sigmoid / softmax are exercised away from 0."""
    cfg, w, m = _setup(zoo, name, dtype)
    for scale, seed in ((1.0, 1), (20.0, 2)):
        x = randn(T, cfg.hc_mult, cfg.hidden_size, seed=seed, scale=scale).to(dtype)
        for i, L in enumerate(m.model.layers):
            lw = model.LayerWeights(w, i)
            for sub, mod in (("attn", L.attn_hc), ("ffn", L.ffn_hc)):
                assert isinstance(mod, DeepseekV4HyperConnection)
                xm, post, comb = HC.hc_pre(x.float(), lw[f"hc_{sub}_fn"], lw[f"hc_{sub}_scale"],
                                           lw[f"hc_{sub}_base"], **_hc_kw(cfg), dtype=dtype)
                p2, c2, x2 = mod(x[None])
                what = f"{name} layer {i} {sub} scale {scale}"
                assert_stage(post, p2[0], f"{what}: post")          # post/comb are fp32 on both sides
                assert_stage(comb, c2[0], f"{what}: comb")
                assert_stage(xm, x2[0], f"{what}: collapsed", dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", STAGE_CASES)
def test_hc_post_matches_decoder_layer_expression(zoo, name, dtype):
    """``hc_post(x, residual, post, comb)`` vs the decoder layer's expression
    ``post·x + combᵀ @ residual`` (post/comb from the layer's own HyperConnection)."""
    cfg, w, m = _setup(zoo, name, dtype)
    residual = randn(T, cfg.hc_mult, cfg.hidden_size, seed=3).to(dtype)
    out = randn(T, cfg.hidden_size, seed=4, scale=3.0).to(dtype)
    for i, L in enumerate(m.model.layers):
        post, comb, _ = L.ffn_hc(residual[None])
        ref = _hf_hc_post(post, comb, out[None], residual[None], dtype)[0]
        ours = HC.hc_post(out.float(), residual.float(), post[0], comb[0], dtype)
        assert_stage(ours, ref, f"{name} layer {i}: hc_post", dtype)
    # comb is used transposed (input stream i -> output stream j): a transposed comb fails
    p, c = post[0], comb[0]
    assert (c - c.transpose(-1, -2)).abs().max() > 1e-3
    wrong = HC.hc_post(out.float(), residual.float(), p, c.transpose(-1, -2), dtype)
    assert max_abs(wrong, ref) > 1e-2


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", STAGE_CASES)
def test_hc_head_matches_hyper_head(zoo, name, dtype):
    cfg, w, m = _setup(zoo, name, dtype)
    assert isinstance(m.model.hc_head, DeepseekV4HyperHead)
    for scale, seed in ((1.0, 5), (20.0, 6)):
        x = randn(T, cfg.hc_mult, cfg.hidden_size, seed=seed, scale=scale).to(dtype)
        ours = HC.hc_head(x.float(), w["hc_head_fn"], w["hc_head_scale"], w["hc_head_base"],
                          hc_eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps, dtype=dtype)
        assert_stage(ours, m.model.hc_head(x[None])[0], f"{name} hc_head scale {scale}", dtype)


@pytest.mark.parametrize("hc_mult", [3, 4, 8])
def test_sinkhorn_properties(hc_mult):
    """Sinkhorn-Knopp output is (approximately) doubly stochastic. Logits ~ N(0, 1), the
    scale of the model's comb logits. Observed after 20 iterations: |col sum - 1| <= 1.2e-6
    (the last step normalises columns; eps=1e-6 leaves ~1e-6), max |row sum - 1| <= 2.5e-3,
    mean |row sum - 1| <= 2e-6; rows converge monotonically with the iteration count."""
    logits = torch.randn(5000, hc_mult, hc_mult, generator=torch.Generator().manual_seed(hc_mult))
    row_err = {}
    for iters in (1, 5, 20):
        c = HC.sinkhorn(logits, iters, 1e-6)
        assert c.shape == logits.shape and (c > 0).all()
        assert (c.sum(-2) - 1).abs().max() < 2e-5, f"iters {iters}: columns do not sum to 1"
        row_err[iters] = (c.sum(-1) - 1).abs()
    assert row_err[20].max() < 2e-2 and row_err[20].mean() < 2e-5
    assert row_err[1].mean() > row_err[5].mean() > row_err[20].mean()
    assert row_err[1].mean() > 1e-2  # one iteration is visibly not row-stochastic
    # small logits converge fully
    c = HC.sinkhorn(logits * 0.5, 20, 1e-6)
    assert (c.sum(-1) - 1).abs().max() < 1e-4 and (c.sum(-2) - 1).abs().max() < 1e-5
    # matches transformers' in-module Sinkhorn (same loop, checked through hc_pre above);
    # here: a permutation-equivariance sanity check
    perm = torch.randperm(hc_mult, generator=torch.Generator().manual_seed(0))
    cp = HC.sinkhorn(logits[:, perm][:, :, perm], 20, 1e-6)
    assert torch.allclose(cp, HC.sinkhorn(logits, 20, 1e-6)[:, perm][:, :, perm], atol=1e-6)


# ============================================================ RoPE
def _hf_rotary(cfg):
    return DeepseekV4RotaryEmbedding(HFConfig(**cfg.to_hf_dict()))


ROPE_POSITIONS = torch.cat([torch.arange(0, 300), torch.tensor([1000, 4095, 4096, 65535, 65536, 100000,
                                                                  524287, 1048575])])


@pytest.mark.parametrize("which", ["mini", "wide", "flash", "pro"])
def test_rope_cos_sin_matches_rotary_embedding(zoo, which):
    """``rope_inv_freq`` / ``rope_cos_sin`` vs ``DeepseekV4RotaryEmbedding`` for both
    profiles ("main": default θ; "compress": YaRN), incl. positions up to 2^20-1, for the
    test configs and the real Flash / Pro presets (rope dim 64, YaRN factor 16 over 65536)."""
    cfg = zoo.case(which).cfg if which in ("mini", "wide") else preset(which)
    rot = _hf_rotary(cfg)
    rd = cfg.qk_rope_head_dim
    for prof, rp in (("main", cfg.rope_main), ("compress", cfg.rope_compress)):
        inv = rope_inv_freq(rp, rd)
        hf_inv = getattr(rot, f"{prof}_inv_freq")
        assert inv.shape == hf_inv.shape == (rd // 2,)
        assert_stage(inv, hf_inv, f"{which} {prof} inv_freq")
        assert getattr(rot, f"{prof}_attention_scaling") == rp.attention_factor
        cos, sin = rope_cos_sin(rp, rd, ROPE_POSITIONS, F32)
        c2, s2 = rot(torch.zeros(1), position_ids=ROPE_POSITIONS[None], layer_type=prof)
        # cos/sin of large angles: both evaluate cos(pos·inv_freq) on the same fp32 angle
        assert_stage(cos, c2[0], f"{which} {prof} cos")
        assert_stage(sin, s2[0], f"{which} {prof} sin")
        cb, sb = rope_cos_sin(rp, rd, ROPE_POSITIONS, BF16)
        c3, s3 = rot(torch.zeros(1, dtype=BF16), position_ids=ROPE_POSITIONS[None], layer_type=prof)
        assert torch.equal(cb, c3[0].float()) and torch.equal(sb, s3[0].float())
    # the compress profile really is YaRN (some frequencies divided by the factor)
    plain = 1.0 / cfg.rope_compress.rope_theta ** (torch.arange(0, rd, 2, dtype=F32) / rd)
    assert cfg.rope_compress.rope_type == "yarn"
    assert (rope_inv_freq(cfg.rope_compress, rd) < plain * 0.99).any()


@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope_matches_apply_rotary_pos_emb(inverse):
    """Interleaved RoPE on the trailing lanes (and its inverse, used on the attention
    output) vs transformers' ``apply_rotary_pos_emb`` (with ``-sin`` for the inverse)."""
    cfg = preset("mini")
    rot = _hf_rotary(cfg)
    pos = torch.arange(0, 3000, 7)
    x = randn(len(pos), 4, cfg.head_dim, seed=7, scale=2.0)
    c, s = rope_cos_sin(cfg.rope_compress, cfg.qk_rope_head_dim, pos, F32)
    ours = apply_rope(x, c[:, None], s[:, None], F32, inverse=inverse)
    c2, s2 = rot(x, position_ids=pos[None], layer_type="compress")
    ref = apply_rotary_pos_emb(x[None].transpose(1, 2), c2, -s2 if inverse else s2).transpose(1, 2)[0]
    assert_stage(ours, ref, f"apply_rope inverse={inverse}")
    assert torch.equal(ours[..., :-cfg.qk_rope_head_dim], x[..., :-cfg.qk_rope_head_dim])  # nope lanes untouched
    back = apply_rope(ours, c[:, None], s[:, None], F32, inverse=not inverse)
    assert max_abs(back, x) < 1e-5


# ============================================================ Q / KV projection
@pytest.mark.parametrize("name", STAGE_CASES)
def test_qkv_proj_rope_matches_attention_projections(zoo, name):
    """``qkv_proj_rope`` vs the attention module's q path (q_a_proj → q_a_norm → q_b_proj →
    unweighted per-head norm → RoPE) and kv path (kv_proj → kv_norm → RoPE), with the
    layer's RoPE profile (main for SWA, compress for CSA/HCA) at positions 5000.."""
    cfg, w, m = _setup(zoo, name)
    x = randn(T, cfg.hidden_size, seed=8)
    pos = torch.arange(T) + 5000
    for i, L in enumerate(m.model.layers):
        A, lw = L.self_attn, model.LayerWeights(w, i)
        prof = "main" if cfg.layer_types[i] == SLIDING else "compress"
        assert A.rope_layer_type == prof
        cos, sin = rope_cos_sin(cfg.rope_for_layer(i), cfg.qk_rope_head_dim, pos, F32)
        q, kv, q_res = qkv_proj_rope(x, lw["attn.wq_a.weight"], lw["attn.q_norm.weight"], lw["attn.wq_b.weight"],
                                     lw["attn.wkv.weight"], lw["attn.norm.weight"], cos, sin,
                                     num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                                     eps=cfg.rms_norm_eps, dtype=F32)
        c2, s2 = m.model.rotary_emb(x[None], position_ids=pos[None], layer_type=prof)
        hs = x[None]
        q_res2 = A.q_a_norm(A.q_a_proj(hs))
        q2 = A.q_b_norm(A.q_b_proj(q_res2).view(1, T, -1, cfg.head_dim).transpose(1, 2))
        q2 = apply_rotary_pos_emb(q2, c2, s2).transpose(1, 2)[0]
        kv2 = A.kv_norm(A.kv_proj(hs)).view(1, T, -1, cfg.head_dim).transpose(1, 2)
        kv2 = apply_rotary_pos_emb(kv2, c2, s2)[0, 0]
        assert_stage(q_res, q_res2[0], f"{name} layer {i}: q_residual")
        assert_stage(q, q2, f"{name} layer {i}: q")
        assert_stage(kv, kv2, f"{name} layer {i}: kv")


# ============================================================ compressors and indexer
def _compress(x, pos, lw, prefix, cfg, ratio, overlap):
    """Whole-sequence compression with the stage functions: project every token, pool every
    complete window (overlap: previous window's front halves + this window's back halves;
    window 0 has no predecessor), RoPE at the window start."""
    kv, score = C.compressor_project(x, lw[prefix + "wkv.weight"], lw[prefix + "wgate.weight"],
                                     lw[prefix + "ape"], pos, F32)
    n = x.shape[0] // ratio
    kvw, sw = kv[:n * ratio].view(n, ratio, -1), score[:n * ratio].view(n, ratio, -1)
    prev_kv = prev_score = None
    if overlap:
        d = kv.shape[-1] // 2
        prev_kv = torch.cat([torch.zeros(1, ratio, d), kvw[:-1, :, :d]])
        prev_score = torch.cat([torch.full((1, ratio, d), float("-inf")), sw[:-1, :, :d]])
    cos, sin = rope_cos_sin(cfg.rope_compress, cfg.qk_rope_head_dim, torch.arange(n) * ratio, F32)
    return C.compress_windows(kvw, sw, prev_kv, prev_score, lw[prefix + "norm.weight"], cos, sin,
                              overlap=overlap, eps=cfg.rms_norm_eps, dtype=F32)


@pytest.mark.parametrize("name", STAGE_CASES)
def test_compressor_entries_match_transformers(zoo, name):
    """Compressed entries of every CSA (ratio 4, overlapping) and HCA (ratio 128) layer vs
    ``DeepseekV4CSACompressor`` / ``DeepseekV4HCACompressor`` run without a cache, on 301
    random tokens (75 / 2 complete windows; the open window is dropped)."""
    cfg, w, m = _setup(zoo, name)
    x = randn(T, cfg.hidden_size, seed=9)
    q_res = randn(T, cfg.q_lora_rank, seed=10)
    pos = torch.arange(T)
    seen = set()
    for i, L in enumerate(m.model.layers):
        lt = cfg.layer_types[i]
        if lt == SLIDING:
            assert L.self_attn.compressor is None
            continue
        comp = L.self_attn.compressor
        assert isinstance(comp, DeepseekV4CSACompressor if lt == CSA else DeepseekV4HCACompressor)
        ratio = cfg.compress_ratio(i)
        ours = _compress(x, pos, model.LayerWeights(w, i), "attn.compressor.", cfg, ratio, lt == CSA)
        ref, _ = comp(x[None], q_res[None], pos[None], None, i)
        assert ours.shape == (T // ratio, cfg.head_dim)
        assert_stage(ours, ref[0, 0], f"{name} layer {i} ({lt}) compressed entries")
        seen.add(lt)
    assert seen == {CSA, HCA}


@pytest.mark.parametrize("name", STAGE_CASES)
def test_indexer_matches_transformers(zoo, name):
    """Indexer keys (its own ratio-4 compressor), scores ``Σ_h w·ReLU(q·k)`` and causal
    top-k vs ``DeepseekV4Indexer`` (no cache). Scores are compared with the scorer's output
    (forward hook); the top-k sets with the tie-aware comparator (observed: identical).
    Top-k is binding here: 75 entries vs index_topk 16 (mini) / 8 (wide)."""
    cfg, w, m = _setup(zoo, name)
    x = randn(T, cfg.hidden_size, seed=11)
    q_res = randn(T, cfg.q_lora_rank, seed=12)
    pos = torch.arange(T)
    csa = [i for i, lt in enumerate(cfg.layer_types) if lt == CSA]
    assert csa
    for i in csa:
        ix = m.model.layers[i].self_attn.compressor.indexer
        assert isinstance(ix, DeepseekV4Indexer)
        lw = model.LayerWeights(w, i)
        captured = {}
        h = ix.scorer.register_forward_hook(lambda mod, args, out: captured.__setitem__("scores", out))
        try:
            ref_top = ix(x[None], q_res[None], pos[None], None, i)[0]
        finally:
            h.remove()
        ratio = cfg.compress_ratio(i)
        keys = _compress(x, pos, lw, "attn.indexer.compressor.", cfg, ratio, True)
        cos, sin = rope_cos_sin(cfg.rope_compress, cfg.qk_rope_head_dim, pos, F32)
        qi, wi = IX.indexer_query(q_res, x, lw["attn.indexer.wq_b.weight"], lw["attn.indexer.weights_proj.weight"],
                                  cos, sin, n_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim, dtype=F32)
        scores = IX.indexer_scores(qi, wi, keys)
        assert_stage(scores, captured["scores"][0], f"{name} layer {i}: index scores")
        top = IX.indexer_topk(scores, pos, ratio, cfg.index_topk)
        assert top.shape == ref_top.shape == (T, min(cfg.index_topk, T // ratio))
        res = TopKTieAware(scores, atol=0.0)(top, ref_top)
        assert res.passed, f"{name} layer {i}: {res.message}"
        # causality: no query selects an entry whose window is not complete
        limit = (pos + 1) // ratio
        assert ((top < limit[:, None]) | (top == -1)).all()
        assert ((top >= 0).sum(-1) == torch.clamp(limit, max=cfg.index_topk)).all()
        assert T // ratio > cfg.index_topk  # the selection is binding for late queries


# ============================================================ MoE
def _moe_ours(cfg, lw, layer, x, ids, dtype):
    hl = cfg.is_hash_layer(layer)
    wts, idx = MOE.gate(x, lw["ffn.gate.weight"], None if hl else lw["ffn.gate.bias"],
                        lw["ffn.gate.tid2eid"] if hl else None, ids, top_k=cfg.num_experts_per_tok,
                        scoring_func=cfg.scoring_func, norm_topk_prob=cfg.norm_topk_prob,
                        routed_scaling_factor=cfg.routed_scaling_factor, dtype=dtype)
    shared = (lw["ffn.shared_experts.w1.weight"], lw["ffn.shared_experts.w3.weight"],
              lw["ffn.shared_experts.w2.weight"])
    y = MOE.moe(x, wts, idx, lw.experts(cfg.n_routed_experts), shared, swiglu_limit=cfg.swiglu_limit, dtype=dtype)
    return wts, idx, y


@pytest.mark.parametrize("dtype,experts", [(F32, None), (F32, "eager"), (BF16, None)],
                         ids=["fp32-default", "fp32-eager", "bf16-default"])
@pytest.mark.parametrize("name", STAGE_CASES)
def test_gate_and_moe_match_sparse_moe_block(zoo, name, dtype, experts):
    """``gate`` (hash and score routing) + ``moe`` (shared + routed SwiGLU experts) vs
    ``DeepseekV4SparseMoeBlock`` of every layer: routing indices (as sets), routing weights
    (captured from the router) and the block output. Inputs at scale 3 so the SwiGLU clamp
    (limit 10) is active. bf16 is compared with the default ``grouped_mm`` experts backend
    (same top-k combine; see test_conformance_transformers for the eager backend)."""
    cfg, w, m = _setup(zoo, name, dtype, experts)
    x = randn(T, cfg.hidden_size, seed=13, scale=3.0).to(dtype)
    ids = token_ids(cfg, T, seed=14)
    hash_layers = 0
    for i, L in enumerate(m.model.layers):
        blk = L.mlp
        assert isinstance(blk, DeepseekV4SparseMoeBlock) and blk.is_hash == cfg.is_hash_layer(i)
        hash_layers += blk.is_hash
        captured = {}
        h = blk.gate.register_forward_hook(lambda mod, args, out: captured.__setitem__("gate", out))
        try:
            ref = blk(x[None], input_ids=ids[None])[0]
        finally:
            h.remove()
        wts, idx, y = _moe_ours(cfg, model.LayerWeights(w, i), i, x.float(), ids, dtype)
        _, ref_w, ref_idx = captured["gate"]
        a, b = idx.sort(-1), ref_idx.sort(-1)
        assert torch.equal(a.values, b.values), f"{name} layer {i}: routed experts differ"
        assert_stage(wts.gather(1, a.indices), ref_w.float().gather(1, b.indices), f"{name} layer {i}: weights", dtype)
        assert_stage(y, ref, f"{name} layer {i}: moe output", dtype)
        if dtype == F32:  # the clamp is exercised
            g = x.float() @ w[f"layers.{i}.ffn.shared_experts.w1.weight"].T
            assert (g > cfg.swiglu_limit).any()
    assert hash_layers >= 1


# ============================================================ attention sublayer / decoder layer
def _hf_attention_sublayer(m, L, x, pos):
    """transformers' attention half of ``DeepseekV4DecoderLayer.forward`` (no cache)."""
    mask = create_sliding_window_causal_mask(config=m.config, inputs_embeds=x[None, :, 0], attention_mask=None,
                                             cache=None, position_ids=pos[None])
    post, comb, collapsed = L.attn_hc(x[None])
    out, _ = L.self_attn(L.input_layernorm(collapsed), position_embeddings=_positions_embeddings(m, x, pos),
                         position_ids=pos[None], attention_mask=mask, cache=None)
    return _hf_hc_post(post, comb, out, x[None], x.dtype)[0], mask


@pytest.mark.parametrize("name", CASE_NAMES)
def test_attention_sublayer_matches_transformers(zoo, name):
    """``model.attention_sublayer`` (hc_pre → attn_norm → qkv → compressor / indexer →
    sparse attention with sinks → inverse RoPE → grouped output projection → hc_post) vs
    transformers' attention half of the decoder layer, every layer (SWA, CSA, HCA), 301
    random tokens (sliding window 128, or 32 for swa32, both exceeded)."""
    cfg, w, m = _setup(zoo, name)
    x = randn(T, cfg.hc_mult, cfg.hidden_size, seed=15)
    pos = torch.arange(T)
    for i, L in enumerate(m.model.layers):
        ref, _ = _hf_attention_sublayer(m, L, x, pos)
        ours = model.attention_sublayer(model.LayerWeights(w, i), cfg, i, x, F32)
        assert_stage(ours, ref, f"{name} layer {i} ({cfg.layer_types[i]}): attention sublayer")
        assert max_abs(ours, x) > 1e-2  # the sublayer changes its input


@pytest.mark.parametrize("name", CASE_NAMES)
def test_decoder_layer_matches_transformers(zoo, name):
    """``attention_sublayer`` then ``moe_sublayer`` vs a whole ``DeepseekV4DecoderLayer``
    call (ties the hc_post expression used above to the layer's real forward)."""
    cfg, w, m = _setup(zoo, name)
    x = randn(T, cfg.hc_mult, cfg.hidden_size, seed=16)
    ids = token_ids(cfg, T, seed=17)
    pos = torch.arange(T)
    for i, L in enumerate(m.model.layers):
        _, mask = _hf_attention_sublayer(m, L, x, pos)
        ref = L(x[None], position_embeddings=_positions_embeddings(m, x, pos), position_ids=pos[None],
                attention_mask=mask, input_ids=ids[None])[0]
        lw = model.LayerWeights(w, i)
        ours = model.moe_sublayer(lw, cfg, i, model.attention_sublayer(lw, cfg, i, x, F32), ids, F32)
        assert_stage(ours, ref, f"{name} layer {i}: decoder layer")
