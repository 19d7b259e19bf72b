"""The one-region decode path of the W8A8 ``moe`` (:mod:`llm_kernels.kernels.deepseek_v4.moe_multi`):
every expert of a step (routed + shared) through stacked packs, asserted **bitwise equal**
to the per-expert path and to the reference (the same exact INT32 sums, the same fp32
epilogue and SwiGLU arithmetic), for decode-sized steps, ragged token counts per expert
and the fall-back above 16 rows per expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.gemm_multi import stack_packs
from llm_kernels.kernels.common.gemm import pack_w8a8
from llm_kernels.kernels.deepseek_v4 import moe as KM
from llm_kernels.kernels.deepseek_v4 import moe_multi as MM
from llm_kernels.numerics.quant import QuantWeight
from llm_kernels.reference.deepseek_v4 import moe as RM

BF16, F32 = torch.bfloat16, torch.float32
TILED = jit.USE_INT8_TILES  # tier avx2 and up (the plain tier packs "nk": nothing to stack)
needs_tiles = pytest.mark.skipif(not TILED, reason="needs an INT8 register tile: tier avx2 or avx512-vnni")


def _qw(o, i, g):
    return QuantWeight(torch.randint(-127, 128, (o, i), dtype=torch.int8, generator=g),
                       torch.rand(o, generator=g) * 1e-3 + 1e-3)


def _layer(E, D, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = [(_qw(I, D, g), _qw(I, D, g), _qw(D, I, g)) for _ in range(E)]
    shared = (_qw(I, D, g), _qw(I, D, g), _qw(D, I, g))
    p_exp = [KM.prepare_expert(*ws) for ws in experts]
    p_sh = KM.prepare_expert(*shared)
    return experts, shared, p_exp, p_sh


def _route(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return w, idx


@pytest.mark.parametrize("T", [1, 2, 5, 16, 40])  # 40 with 4 experts: > 16 rows per expert -> per-expert calls
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("D,I", [(128, 64), (70, 36)])  # the second: K not a multiple of 4, N not of 64
def test_stacked_moe_bitwise(T, dtype, D, I, monkeypatch):
    E, K = 4, 2
    experts, shared, p_exp, p_sh = _layer(E, D, I)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype).float()
    w, idx = _route(T, E, K, T)
    plain = KM.moe(x, w, idx, p_exp, p_sh, swiglu_limit=0.5, dtype=dtype)   # not stacked: per-expert calls
    st = MM.stack_experts([KM.expert_pack(*ws) for ws in p_exp] + [KM.expert_pack(*p_sh)])
    assert (st is not None) == TILED                    # the plain tier's "nk" packs are not stacked
    assert st is None or st.p13.parts == E + 1
    calls = []
    real = MM.multi_expert_parts
    monkeypatch.setattr(KM, "multi_expert_parts", lambda *a: calls.append(real(*a)) or calls[-1])
    stacked = KM.moe(x, w, idx, p_exp, p_sh, swiglu_limit=0.5, dtype=dtype)
    ref = RM.moe(x, w, idx, experts, shared, swiglu_limit=0.5, dtype=dtype)
    max_rows = max(int((idx == e).sum()) for e in range(E))
    if TILED:
        ran = bool(calls) and calls[0] is not None
        assert ran == (max(max_rows, T) <= 16)   # the shared expert runs all T rows
    else:
        assert not calls
    assert torch.equal(stacked, plain)
    assert torch.equal(stacked, ref)
    # the same list again (as an engine passes each step): the stack's slot table, then the
    # quantisation, routing, both multi-GEMMs, the scatter and the combine as one dispatch
    # (float32 activations); the same bits
    dec = []
    real_dec = KM._stacked_decode
    monkeypatch.setattr(KM, "_stacked_decode", lambda *a: dec.append(real_dec(*a)) or dec[-1])
    for _ in range(2):
        assert torch.equal(KM.moe(x, w, idx, p_exp, p_sh, swiglu_limit=0.5, dtype=dtype), ref)
    if TILED:
        assert len(dec) == 2 and all((r is not None and r[2]) == (T <= 16) for r in dec)
        if T <= 16:
            assert st.slot_cache[0] is p_exp and st.slot_cache[1].tolist() == list(range(E))
    # bf16 activations (the same values, so a bf16 run): routing, multi-GEMMs and scatter in
    # one dispatch, the quantisation and the combine called around it; the same bits
    prog = []
    real_prog = MM.stacked_moe_program
    monkeypatch.setattr(KM, "stacked_moe_program", lambda *a: prog.append(real_prog(*a)) or prog[-1])
    for _ in range(2 if dtype == BF16 else 0):
        assert torch.equal(KM.moe(x.to(BF16), w, idx, p_exp, p_sh, swiglu_limit=0.5, dtype=dtype), ref)
    if TILED and dtype == BF16:
        assert len(prog) == (2 if T <= 16 else 0) and all((J >= 0) == (max_rows <= 16) for _, J in prog)
    # a list with an expert outside the stack falls back to the per-expert calls
    other = list(p_exp)
    other[1] = KM.prepare_expert(*experts[1])
    for _ in range(2):
        assert torch.equal(KM.moe(x, w, idx, other, p_sh, swiglu_limit=0.5, dtype=dtype), ref)
    # the packs still unpack to the weights (their data are views of the stack now)
    assert all(torch.equal(a.qweight, b.qweight) for a, b in zip(p_exp[1], experts[1]))


@pytest.mark.parametrize("T,E,K", [(1, 8, 3), (4, 16, 6), (5, 4, 4), (16, 64, 6)])
def test_route_parts_is_nonzero_per_expert(T, E, K):
    """route_parts: the used experts ascending, each one's (token, slot) rows in the order
    np.nonzero(idx == e) gives, their scales, and the shared part with every row."""
    w, idx = _route(T, E, K, 7 * T + E)
    idx = idx.numpy()
    sx = np.random.default_rng(T).random(T).astype(np.float32)
    used, nr, ridx, kslot, sxp = MM.route_parts(idx, E, sx)
    assert used.tolist() == np.unique(idx).tolist()
    J = len(used)
    for j, e in enumerate(used.tolist()):
        tok, slot = np.nonzero(idx == e)
        n = int(nr[j])
        assert n == len(tok) and ridx[j, :n].tolist() == tok.tolist() and kslot[j, :n].tolist() == slot.tolist()
        assert np.array_equal(sxp[j, :n], sx[tok])
    assert nr[J] == T and ridx[J, :T].tolist() == list(range(T)) and np.array_equal(sxp[J, :T], sx)
    y = np.zeros((T, K, 3), np.float32)
    yp = np.random.default_rng(0).random((J + 1, ridx.shape[1], 3)).astype(np.float32)
    MM.scatter_parts(yp, ridx, kslot, nr, J, y)
    for j in range(J):
        for r in range(int(nr[j])):
            assert np.array_equal(y[ridx[j, r], kslot[j, r]], yp[j, r])
    bad = idx.copy()
    bad[0, 0] = E
    assert MM.route_parts(bad, E, sx)[1][0] == -1 and len(MM.route_parts(bad, E, sx)[0]) == 0


@needs_tiles
def test_stack_packs_views_and_errors():
    g = torch.Generator().manual_seed(3)
    packs = [pack_w8a8(torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=g), torch.rand(64) + 0.5)
             for _ in range(3)]
    before = [p.data.copy() for p in packs]
    st = stack_packs(packs)
    for i, p in enumerate(packs):
        assert np.shares_memory(p.data, st.data) and np.array_equal(p.data, before[i])
        assert st.data[i].ctypes.data % 64 == 0
    other = pack_w8a8(torch.zeros(128, 32, dtype=torch.int8), torch.ones(128))
    with pytest.raises(ValueError, match="share shape"):
        stack_packs(packs + [other])
    with pytest.raises(ValueError, match="at least one"):
        stack_packs([])
    with pytest.raises(ValueError, match="tiled layout"):
        stack_packs([pack_w8a8(torch.zeros(64, 32, dtype=torch.int8), torch.ones(64), layout="nk")])


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    from llm_kernels.checkpoint import write_random_checkpoint
    from llm_kernels.models import preset

    d = tmp_path_factory.mktemp("ckpt_mini_stack")
    write_random_checkpoint(preset("mini"), d, seed=0, dtype=BF16, progress=False)
    return d


@needs_tiles
def test_prepare_weights_stacks_each_layer(mini_checkpoint):
    from llm_kernels.checkpoint import load_checkpoint
    from llm_kernels.kernels.deepseek_v4.prepare import prepare_weights
    from llm_kernels.kernels.common.prepared import stage_group

    cfg, w = load_checkpoint(mini_checkpoint, dtype=BF16, progress=False, quant="int8")
    out = prepare_weights(w, cfg)
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}.ffn."
        names = [p + f"experts.{e}." for e in range(cfg.n_routed_experts)] + [p + "shared_experts."]
        groups = [stage_group(tuple(out[n + f"{j}.weight"] for j in ("w1", "w3", "w2")), KM.ExpertPack)
                  for n in names]
        assert len({id(g.stack) for g in groups}) == 1 and groups[0].stack.p13.parts == len(names)
        assert sorted(g.slot for g in groups) == list(range(len(names)))
        assert out[f"layers.{layer}.attn.wo_a.weight"].stack.parts == cfg.o_groups
        assert out[f"layers.{layer}.attn.wo_b.weight"].stack.parts == cfg.o_groups
    again = prepare_weights(out, cfg)                   # idempotent: the stacks are kept
    assert again[p + "experts.0.w1.weight"].group.stack is out[p + "experts.0.w1.weight"].group.stack
