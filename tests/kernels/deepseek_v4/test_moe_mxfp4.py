"""MXFP4 routed experts (kept 4-bit) in the fused DeepSeek-V4 MoE: the W4A8 GEMM
(:mod:`llm_kernels.kernels.common.gemm_mxfp4`) for ``[w1; w3]`` and w2, the float path's
SwiGLU/combine around it, next to int8_g32 / float shared experts.

Each expert GEMM is bitwise the golden ``mxfp4_linear`` (same per-32 activation
quantisation, exact block sums, the same fold) and the rounding points are the reference's,
so the fused ``moe`` is asserted **bitwise equal** to the reference ``moe`` (which runs
``numerics.linear``), prepared at load or not; and a random checkpoint with MXFP4 experts and
int8_g32 elsewhere decodes to the reference's logits (bitwise with the reference's
hyper-connection stages, as ``tests/checkpoint/test_int8_g32_scheme.py``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.prepared import PackedMXFP4Linear, PackedMXFP4Rows, PreparedMXFP4Weight
from llm_kernels.kernels.deepseek_v4 import moe as KM
from llm_kernels.kernels.deepseek_v4.prepare import prepare_weights
from llm_kernels.numerics.group_quant import GroupQuantWeight, quantize_weight_grouped
from llm_kernels.numerics.mxfp4 import MXFP4Weight, quantize_mxfp4
from llm_kernels.numerics.rounding import rnd
from llm_kernels.reference.deepseek_v4 import moe as RM

BF16, F32 = torch.bfloat16, torch.float32


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _f(shape, seed):
    return torch.randn(shape, generator=_g(seed)) / shape[1] ** 0.5


def _experts(D, I, E, shared_kind):
    experts = [tuple(quantize_mxfp4(_f(s, 100 + 3 * e + j)) for j, s in enumerate(((I, D), (I, D), (D, I))))
               for e in range(E)]
    sh = [_f(s, 10 + j) for j, s in enumerate(((I, D), (I, D), (D, I)))]
    shared = tuple(quantize_weight_grouped(w) for w in sh) if shared_kind == "g32" else tuple(w.to(BF16) for w in sh)
    return experts, shared


def _route(x, E, K, dtype, seed):
    gate_w = _f((E, x.shape[1]), seed).to(BF16)
    return RM.gate(x, gate_w, None, None, torch.arange(x.shape[0]), top_k=K, scoring_func="sqrtsoftplus",
                   norm_topk_prob=True, routed_scaling_factor=1.5, dtype=dtype)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shared_kind", ["g32", "float"])
@pytest.mark.parametrize("D,I,E,K", [(128, 64, 8, 2), (96, 160, 6, 3)])
def test_fused_moe_is_bitwise_the_reference(D, I, E, K, shared_kind, dtype):
    experts, shared = _experts(D, I, E, shared_kind)
    prepared = [KM.prepare_expert(*ws) for ws in experts]
    assert all(isinstance(p, PreparedMXFP4Weight) for ws in prepared for p in ws)
    for T in (1, 5, 8, 20):
        x = rnd(torch.randn(T, D, generator=_g(T)) * 2, dtype)
        w, i = _route(x, E, K, dtype, 7)
        for lim in (10.0, 0.05):
            ref = RM.moe(x, w, i, experts, shared, swiglu_limit=lim, dtype=dtype)
            assert torch.equal(KM.moe(x, w, i, experts, shared, swiglu_limit=lim, dtype=dtype), ref), (T, lim)
            assert torch.equal(KM.moe(x, w, i, prepared, shared, swiglu_limit=lim, dtype=dtype), ref), (T, lim)
    # the prepared reference-side view is the weight it came from (the reference may run on it)
    p1, p3, p2 = prepared[0]
    assert torch.equal(p1.packed, experts[0][0].packed) and torch.equal(p3.packed, experts[0][1].packed)
    assert torch.equal(p2.packed, experts[0][2].packed) and p1.shape == experts[0][0].shape
    x = rnd(torch.randn(3, D, generator=_g(1)), dtype)
    w, i = _route(x, E, K, dtype, 7)
    assert torch.equal(RM.moe(x, w, i, prepared, shared, swiglu_limit=10.0, dtype=dtype),
                       RM.moe(x, w, i, experts, shared, swiglu_limit=10.0, dtype=dtype))


@pytest.mark.skipif(not jit.USE_INT8_TILES, reason="needs an INT8 register tile: tier avx2 or avx512-vnni "
                    "(the plain tier's 'nk' MXFP4 packs are not stacked)")
@pytest.mark.parametrize("T", [1, 2, 4, 16, 40])  # 40 with 4 experts, top-2: > 16 rows per expert -> per-expert calls
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("D,I", [(128, 64), (96, 160)])  # the second: N = 2I and D not multiples of 64
def test_stacked_mxfp4_moe_is_bitwise_the_per_expert_path(T, dtype, D, I, monkeypatch):
    """The one-region path (:func:`.moe_multi.multi_mxfp4_parts` over a stack) gives the same
    bits as the per-expert W4A8 calls and the reference, runs exactly when every expert has
    at most 16 rows, and leaves the packs unpacking to their weights."""
    from llm_kernels.kernels.deepseek_v4 import moe_multi as MM

    E, K = 4, 2
    experts, shared = _experts(D, I, E, "g32")
    prepared = [KM.prepare_expert(*ws) for ws in experts]
    x = rnd(torch.randn(T, D, generator=_g(T)) * 2, dtype)
    w, i = _route(x, E, K, dtype, 7)
    plain = KM.moe(x, w, i, prepared, shared, swiglu_limit=0.5, dtype=dtype)     # not stacked yet
    st = MM.stack_mxfp4_experts([(p1.group, p2.pack) for p1, _, p2 in prepared])
    assert st is not None and st.p13.parts == E and st.p2.parts == E and st.inter == I
    calls = []
    real = MM.multi_mxfp4_parts
    monkeypatch.setattr(KM, "multi_mxfp4_parts", lambda *a: calls.append(real(*a)) or calls[-1])
    stacked = KM.moe(x, w, i, prepared, shared, swiglu_limit=0.5, dtype=dtype)
    max_rows = max(int((i == e).sum()) for e in range(E))
    assert bool(calls) and (calls[0] is not None) == (max_rows <= 16), (T, max_rows)
    assert torch.equal(stacked, plain)
    assert torch.equal(stacked, RM.moe(x, w, i, experts, shared, swiglu_limit=0.5, dtype=dtype))
    for (p1, p3, p2), ws in zip(prepared, experts):    # views of the stack now
        assert torch.equal(p1.packed, ws[0].packed) and torch.equal(p3.packed, ws[1].packed)
        assert torch.equal(p2.packed, ws[2].packed) and torch.equal(p2.scale, ws[2].scale)
    # a mixed step (one expert not of this stack) runs per expert, same bits
    calls.clear()
    other = list(prepared)
    other[int(i[0, 0])] = KM.prepare_expert(*experts[int(i[0, 0])])
    assert torch.equal(KM.moe(x, w, i, other, shared, swiglu_limit=0.5, dtype=dtype), plain) and not calls


@pytest.mark.parametrize("T", [0, 3])
def test_stacked_mxfp4_moe_without_routes_is_the_shared_expert(T):
    """A call with no routing slots (K = 0: the expert-parallel wrapper's shared-only call)
    or no rows runs the shared expert alone, as the reference, on a stacked MXFP4 layer."""
    from llm_kernels.kernels.deepseek_v4 import moe_multi as MM

    D, I, E = 128, 64, 4
    experts, shared = _experts(D, I, E, "g32")
    prepared = [KM.prepare_expert(*ws) for ws in experts]
    assert MM.stack_mxfp4_experts([(p1.group, p2.pack) for p1, _, p2 in prepared]) is not None
    x = rnd(torch.randn(T, D, generator=_g(5)), BF16)
    w, i = torch.zeros(T, 0), torch.zeros(T, 0, dtype=torch.long)
    got = KM.moe(x, w, i, prepared, shared, swiglu_limit=0.5, dtype=BF16)
    assert got.shape == (T, D)
    assert torch.equal(got, RM.moe(x, w, i, experts, shared, swiglu_limit=0.5, dtype=BF16))


def test_stack_mxfp4_experts_refuses_what_it_cannot_stack():
    from llm_kernels.kernels.common.gemm_mxfp4 import pack_mxfp4, stack_mxfp4
    from llm_kernels.kernels.deepseek_v4 import moe_multi as MM

    experts, _ = _experts(64, 32, 3, "float")
    one = KM.prepare_expert(*experts[0])
    assert MM.stack_mxfp4_experts([(one[0].group, one[2].pack)]) is None          # fewer than two
    nk = [pack_mxfp4(ws[0], "nk") for ws in experts[:2]]
    with pytest.raises(ValueError, match="'w4' layout"):
        stack_mxfp4(nk)
    with pytest.raises(ValueError, match="at least one"):
        stack_mxfp4([])
    if jit.USE_INT8_TILES:
        a, b = pack_mxfp4(experts[0][0]), pack_mxfp4(experts[0][2])                 # [32, 64] vs [64, 32]
        with pytest.raises(ValueError, match="share shape"):
            stack_mxfp4([a, b])
        two = [KM.prepare_expert(*ws) for ws in experts[:2]]
        bad = [(two[0][0].group, two[0][2].pack), (two[1][0].group, pack_mxfp4(experts[1][2], "nk"))]
        assert MM.stack_mxfp4_experts(bad) is None and two[0][0].group.stack is None


def test_prepare_expert_keeps_four_bits_and_is_idempotent():
    I, D = 64, 128
    ws = tuple(quantize_mxfp4(_f(s, j)) for j, s in enumerate(((I, D), (I, D), (D, I))))
    p1, p3, p2 = KM.prepare_expert(*ws)
    assert isinstance(p1, PackedMXFP4Rows) and isinstance(p3, PackedMXFP4Rows) and p1.group is p3.group
    assert isinstance(p2, PackedMXFP4Linear)
    assert KM.prepare_expert(p1, p3, p2) == (p1, p3, p2)
    p13, pw2 = KM.mxfp4_expert_packs(p1, p3, p2)
    assert p13 is p1.group.pack and pw2 is p2.pack
    assert p13.nbytes == 2 * I * (D // 2 + D // 32) and pw2.nbytes == D * (I // 2 + I // 32)
    with pytest.raises(ValueError, match="SwiGLU"):
        KM.mxfp4_expert_packs(ws[0], ws[2], ws[2])


# --------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    """The ``mini`` random checkpoint loaded as int8_g32, its routed experts replaced by
    ``quantize_mxfp4`` of their float (bf16) weights; shared experts stay int8_g32."""
    from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
    from llm_kernels.models import preset

    d = tmp_path_factory.mktemp("ckpt_mini_mxfp4")
    write_random_checkpoint(preset("mini"), d, seed=0, dtype=BF16, progress=False)
    cfg, w = load_checkpoint(d, dtype=BF16, quant="int8_g32", progress=False)
    _, wf = load_checkpoint(d, dtype=BF16, quant="none", progress=False)
    routed = [n for n in w if ".ffn.experts." in n and n.endswith((".w1.weight", ".w2.weight", ".w3.weight"))]
    assert routed
    for n in routed:
        w[n] = quantize_mxfp4(wf[n].float())
    return cfg, w, routed


def _rows(w, cfg, ops, ids, prefill=24):
    from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine

    eng = DeepSeekV4Engine(w, cfg, dtype=BF16, max_seq_len=len(ids) + 4, ops=ops)
    (sid,), (lg,) = eng.prefill([ids[:prefill]])
    return torch.cat([lg] + [eng.decode([sid], [t])[0] for t in ids[prefill:]])


def test_engine_mxfp4_experts_fused_vs_reference(mxfp4_model):
    """24-token prefill + 12 decode steps. Prepared at load: every routed expert is an
    MXFP4 pack, everything else group-scaled INT8. With the reference's hyper-connection
    stages the fused engine is **bitwise** the reference (every quantised stage is exact);
    fully fused, the logits agree to a cosine floor (the fused ``hc_*`` sum in another
    fp32 order, ``test_int8_weights.py``)."""
    from llm_kernels.runtime.deepseek_v4.stages import FUSED_OPS, REFERENCE_OPS

    cfg, w, routed = mxfp4_model
    pw = prepare_weights(dict(w), cfg)
    assert all(isinstance(pw[n], PreparedMXFP4Weight) for n in routed)
    assert all(isinstance(pw[n], GroupQuantWeight) for n in pw if ".ffn.shared_experts." in n and "weight" in n)
    assert not any(isinstance(v, MXFP4Weight) for n, v in pw.items() if n not in routed)
    for layer in range(cfg.num_hidden_layers):           # each layer's routed experts stacked once
        gs = [pw[f"layers.{layer}.ffn.experts.{e}.w1.weight"].group for e in range(cfg.n_routed_experts)]
        assert (len({id(g.stack) for g in gs}) == 1 and gs[0].stack is not None) == jit.USE_INT8_TILES
        assert sorted(g.slot for g in gs) == (list(range(len(gs))) if jit.USE_INT8_TILES else [-1] * len(gs))
    ids = torch.randint(0, cfg.vocab_size, (36,), generator=_g(3)).tolist()
    ref = _rows(dict(w), cfg, REFERENCE_OPS, ids)
    ops = SimpleNamespace(**vars(FUSED_OPS))
    for s in ("hc_pre", "hc_pre_norm", "hc_post", "hc_post_pre_norm", "hc_head"):
        setattr(ops, s, getattr(REFERENCE_OPS, s))
    assert torch.equal(_rows(dict(w), cfg, ops, ids), ref)
    fused = _rows(dict(w), cfg, FUSED_OPS, ids)
    cos = torch.nn.functional.cosine_similarity(fused.flatten().double(), ref.flatten().double(), dim=0)
    assert cos > 0.999, f"logits cosine {cos:.6f}"
