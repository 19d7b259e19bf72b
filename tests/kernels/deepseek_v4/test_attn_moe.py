"""Fused ``sparse_attn`` / ``gate`` / ``moe`` / ``rms_norm`` / ``linear`` kernels
(``llm_kernels.kernels.deepseek_v4``) vs the torch reference, through the golden harness.

Dims: ``mini`` (preset), an odd-sized config (tails everywhere: OL % 4 != 0, H/G = 2,
HD = 40, rope 8, D = 96), and the real Flash dims (H=64, HD=512, G=8, OL=1024, D=4096,
I=2048; 128 window rows + 512 compressed rows per query; 16 experts top-6 instead of 256 to
keep the test's memory small, the gate also at E=256). T in {1, 8}, float32 / bfloat16,
float / W8A8 weights.

Tolerances (observed values in brackets, Flash dims, this machine):

* float32, float weights: ``AllClose(rtol=1e-5, atol=1e-6)``. The kernels differ from the
  reference only in fp32 summation order (wo_a GEMV, gathered vs dense PV/QK); the softmax
  and the MoE paths are bit-exact. [sparse_attn max abs 4.6e-7 on outputs of scale 0.4;
  moe/gate bit-exact]
* bfloat16, float weights: ``Bf16ScaleClose``: ``|a - e| <= 2^-7·(|e| + max|e|)``, one
  bf16 ulp of the value or of the tensor's scale (outputs near zero). An fp32 intermediate
  (PV, wo_a sums; the softmax is bit-identical) rounds to the other bf16 neighbour on a
  tie edge, and that step moves the outputs it feeds by ~an ulp at the output scale.
  [95 % of sparse_attn outputs bit-identical; max abs 1.95e-3 = 1 ulp at the output scale
  0.45 (bound 3.5e-3); moe/gate bit-exact]
* W8A8 (``wo_b``, experts): ``RatioAllClose(atol=1e-4, rtol=1/128,
  max_outlier_ratio=0.005, max_outlier_error=2^-6)``: the INT8 re-quantisation of an fp32/bf16 intermediate flips
  one INT8 step when that intermediate moved by an ulp across a rounding edge (and a
  per-row scale moves when the row's max element does), which shifts the output by up to
  ~1 % of a row's scale. [sparse_attn bf16 17/32768 = 0.05 % outliers, worst 2.4e-4 at scale
  0.45, fp32 0; moe bit-exact; the same on the forced fallback]
* router indices: ``TopKTieAware`` on the selection scores ``score + bias`` (accepts swaps
  of equal scores only). [identical sets]

Also: edge cases (duplicate / padding-only index rows, out-of-range index), bitwise
determinism for 1 vs 2 Numba threads (and 1 vs 2 torch threads, which the bmm/linear calls
inside the kernels use), and an end-to-end check of ``DeepSeekV4Engine(ops=FUSED_OPS)``
against the reference backend on a random mini checkpoint.

``python tests/kernels/deepseek_v4/test_attn_moe.py bench`` (or ``pytest -m slow -k bench
-s``) runs the micro-benchmark at Flash dims (reference vs fused, T=1 and T=8, % of the
DRAM roofline for the weight-streaming parts).
"""

from __future__ import annotations

import sys
from functools import lru_cache

import numba
import pytest
import torch

from llm_kernels.models import preset
from llm_kernels.harness import (AllClose, Comparator, GoldenCase, Normal, RandInt, RatioAllClose, TensorSpec,
                                 TopKTieAware, run_case)
from llm_kernels.kernels.common import linear as KL
from llm_kernels.kernels.deepseek_v4 import moe as KM
from llm_kernels.kernels.deepseek_v4 import norm as KN
from llm_kernels.kernels.deepseek_v4 import sparse_attn as KA
from llm_kernels.reference.deepseek_v4 import moe as RM
from llm_kernels.reference.deepseek_v4 import sparse_attn as RA
from llm_kernels.kernels.common.bf16 import TORCH_BF16_DOT
from llm_kernels.numerics.linear import linear as r_linear
from llm_kernels.reference.deepseek_v4.common import rms_norm as r_rms_norm
from llm_kernels.numerics.rounding import rnd
from llm_kernels.reference.deepseek_v4.common import rope_cos_sin
from llm_kernels.numerics.quant import QuantWeight, quantize_weight

F32, BF16 = torch.float32, torch.bfloat16


class Bf16ScaleClose(Comparator):
    """``|a - e| <= rel·(|e| + max|e|)``: within one bf16 ulp (relative spacing <= 2^-7) of
    the element or of the tensor's scale. An fp32 intermediate that rounds to the other
    bf16 neighbour moves every output it feeds by an absolute amount of the order of an ulp
    at the output scale, which is many ulps of an output that cancels to ~0; a plain
    ``rtol`` cannot express that, a fixed ``atol`` depends on the data's scale."""

    def __init__(self, rel: float = 2 ** -7):
        self.rel = float(rel)

    def describe(self) -> str:
        return f"Bf16ScaleClose(rel={self.rel:g})"

    __repr__ = describe

    def __call__(self, actual, expected):
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
        res = AllClose(rtol=self.rel, atol=self.rel * scale)(actual, expected)
        return self._result(res.passed, f"scale {scale:.4g}: {res.message}", res.report)


def _float_cmp(dtype):
    return AllClose(rtol=1e-5, atol=1e-6) if dtype == F32 else Bf16ScaleClose()


# Outlier cap 2^-6 (absolute): the worst outlier seen (fast and forced-fallback runs, all
# dims) is 2.44e-4 at output scale 0.45 (Flash bf16 sparse_attn, 17 outliers); the cap is 64x
# that, ~3.5 % of that output scale (above the ~1 % an INT8 step can move); the MoE outputs
# (scale up to 32) have been bit-exact, so any outlier there is a finding, not noise.
W8A8_CMP = RatioAllClose(atol=1e-4, rtol=1 / 128, max_outlier_ratio=0.005, max_outlier_error=2 ** -6)
# Without a bf16 dot (TORCH_BF16_DOT False: AVX2 CPUs such as Zen 3) the kernel computes
# the bf16 scores and PV through an fp32 bmm, the reference through torch's bf16 matmul
# (transformers' operation): the fp32 sums run in a different order, ~1.7e-4 of the bf16
# scores land on the other bf16 neighbour and each such score renormalises its head's
# probabilities (with a bf16 dot both run the same oneDNN dot and the scores agree
# bitwise). After wo_b's INT8 requantisation that is 4.6 % outliers at Flash dims T=1
# (Zen 3), the worst 9.8e-4 = 0.28 % of the output scale 0.35. Budget 10 %, cap 2^-8
# (~1 % of that scale, about one INT8 step of the output).
W8A8_CMP_FP32_SCORES = RatioAllClose(atol=1e-4, rtol=1 / 128, max_outlier_ratio=0.10, max_outlier_error=2 ** -8)


def _cmp(dtype, quant):
    return W8A8_CMP if quant else _float_cmp(dtype)


def _attn_cmp(dtype, quant):
    if quant and dtype == BF16 and not TORCH_BF16_DOT:
        return W8A8_CMP_FP32_SCORES
    return _cmp(dtype, quant)


@pytest.fixture(autouse=True, scope="module")
def _clear_weight_caches():
    """The cached test weights are reused by several tests; dropped at the end."""
    yield
    for f in (_base_weight, _quant_weight, _attn_weights, _moe_weights):
        f.cache_clear()


# --------------------------------------------------------------------------- dims
# name: (H, HD, rope_dim, G, OL, D)
ATTN_DIMS = {
    "mini": (4, 64, 16, 2, 32, 128),
    "odd": (6, 40, 8, 3, 22, 96),
    "flash": (64, 512, 64, 8, 1024, 4096),
}
# name: (D, I, E, K)
MOE_DIMS = {
    "mini": (128, 64, 8, 2),
    "odd": (96, 46, 6, 3),
    "flash": (4096, 2048, 16, 6),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@lru_cache(maxsize=None)
def _quant_weight(out: int, inp: int, seed: int) -> QuantWeight:
    """A W8 weight: uniform INT8 codes with per-channel scales such that the weight has
    std ~ 1/sqrt(in) (like the checkpoints' init). Random codes instead of quantising a
    Gaussian keep the Flash-size expert sets cheap to build (the kernels only see INT8
    codes and scales either way)."""
    g = _gen(seed)
    q = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    scale = (0.5 + torch.rand(out, generator=g)) * (3 ** 0.5 / 127) * inp ** -0.5
    return QuantWeight(q, scale.float())


@lru_cache(maxsize=None)
def _base_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """Float weight stored in bf16 (as the checkpoints): the dequantised W8 weight."""
    w = _quant_weight(out, inp, seed)
    return (w.qweight.float() * w.scale[:, None]).to(BF16)


def _weight(out: int, inp: int, seed: int, dtype: torch.dtype, quant: bool):
    """The bf16 float weight cast to ``dtype`` (exact), or the W8 weight (W8A8 weights do not
    depend on the activation dtype, so both dtypes share one QuantWeight)."""
    return _quant_weight(out, inp, seed) if quant else _base_weight(out, inp, seed).to(dtype)


@lru_cache(maxsize=None)
def _attn_weights(dims: str, dtype: torch.dtype, quant: bool):
    H, HD, _, G, OL, D = ATTN_DIMS[dims]
    return _weight(G * OL, H // G * HD, 11, dtype, False), _weight(D, G * OL, 12, dtype, quant)


@lru_cache(maxsize=3)
def _moe_weights(dims: str, dtype: torch.dtype, quant: bool):
    D, I, E, _ = MOE_DIMS[dims]
    if quant:
        dtype = BF16        # one cache entry for both activation dtypes

    def expert(s):
        return (_weight(I, D, s, dtype, quant), _weight(I, D, s + 1, dtype, quant), _weight(D, I, s + 2, dtype, quant))

    return [expert(100 + 3 * e) for e in range(E)], expert(10)


# --------------------------------------------------------------------------- sparse_attn
def _attn_layout(T: int, window: int, n_comp: int, topk: int, seed: int) -> tuple[int, torch.Tensor]:
    """Pool ``[window-1 old rows | T new rows | n_comp compressed]`` and per-query indices:
    the query's own window (positions p-window+1 .. p) plus ``topk`` distinct compressed rows."""
    g = _gen(seed)
    base = window - 1 + T
    N = base + n_comp
    rows = []
    for t in range(T):
        win = torch.arange(t, t + window)
        comp = torch.randperm(n_comp, generator=g)[:topk] + base
        rows.append(torch.cat([win, comp]))
    return N, torch.stack(rows)


def _attn_case(dims: str, T: int, dtype: torch.dtype, quant: bool, layout=None) -> GoldenCase:
    H, HD, rd, G, OL, D = ATTN_DIMS[dims]
    if layout is None:
        window, n_comp, topk = (128, 1024, 512) if dims == "flash" else (16, 40, 12)
        N, idx = _attn_layout(T, window, n_comp, topk, seed=T)
    else:
        N, idx = layout
    cfg = preset("mini")
    cos, sin = rope_cos_sin(cfg.rope_main, rd, torch.arange(T) + 1000, dtype)
    wo_a, wo_b = _attn_weights(dims, dtype, quant)

    def run(mod):
        def f(v):
            out = mod.sparse_attn(rnd(v["q"], dtype), rnd(v["kv_pool"], dtype), v["indices"], v["attn_sink"],
                                  cos, sin, wo_a, wo_b, o_groups=G, softmax_scale=HD ** -0.5, dtype=dtype)
            return {"out": out}
        return f

    name = f"sparse_attn/{dims}_T{T}_{str(dtype)[6:]}_{'w8a8' if quant else 'float'}"
    return GoldenCase(name, [
        TensorSpec("q", (T, H, HD), F32, Normal(seed=1 + T)),
        TensorSpec("kv_pool", (N, HD), F32, Normal(seed=2 + T)),
        TensorSpec("indices", tuple(idx.shape), torch.int64, idx),
        TensorSpec("attn_sink", (H,), F32, Normal(seed=3)),
        TensorSpec("out", (T, D), F32, is_output=True),
    ], run(RA), run(KA), {"out": _attn_cmp(dtype, quant)})


@pytest.mark.parametrize("quant", [False, True], ids=["float", "w8a8"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("dims", ["mini", "odd", "flash"])
def test_sparse_attn_matches_reference(dims, T, dtype, quant):
    assert run_case(_attn_case(dims, T, dtype, quant)).passed


@pytest.mark.parametrize("quant", [False, True], ids=["float", "w8a8"])
@pytest.mark.parametrize("T", [1, 8])
def test_sparse_attn_fp32_bmm_path_on_every_cpu(T, quant, monkeypatch):
    """The scores/PV path of CPUs without a bf16 dot (fp32 ``bmm`` of the bf16 values, one
    rounding), forced on whatever CPU runs the test, against the reference at Flash dims
    with the bound stated for that path (``W8A8_CMP_FP32_SCORES``; float weights: the bf16
    comparator)."""
    monkeypatch.setattr(KA, "BF16_MATMUL", False)
    case = _attn_case("flash", T, BF16, quant)
    case.comparators["out"] = W8A8_CMP_FP32_SCORES if quant else _float_cmp(BF16)
    assert run_case(case).passed


def test_sparse_attn_edge_cases():
    """Duplicate indices (the reference's dense mask counts a row once), an all-padding
    query (output 0 after the projections), indices beyond a short pool, and the range
    check (IndexError like the reference)."""
    T, N = 3, 20
    idx = torch.tensor([[0, 3, 3, 7, -1, 7, 19, -1],      # duplicates + padding
                        [-1, -1, -1, -1, -1, -1, -1, -1],  # nothing to attend
                        [5, 4, 3, 2, 1, 0, 10, 11]])       # unsorted
    for dtype in (F32, BF16):
        for quant in (False, True):
            assert run_case(_attn_case("odd", T, dtype, quant, layout=(N, idx))).passed
    H, HD, rd, G, OL, D = ATTN_DIMS["odd"]
    wo_a, wo_b = _attn_weights("odd", F32, False)
    cos, sin = rope_cos_sin(preset("mini").rope_main, rd, torch.arange(1), F32)
    with pytest.raises(IndexError):
        KA.sparse_attn(torch.randn(1, H, HD), torch.randn(N, HD), torch.tensor([[0, N]]), torch.zeros(H),
                       cos, sin, wo_a, wo_b, o_groups=G, softmax_scale=0.1, dtype=F32)


# --------------------------------------------------------------------------- gate
def _gate_case(D: int, E: int, K: int, T: int, dtype: torch.dtype, scoring: str, hashed: bool) -> GoldenCase:
    gate_w = _weight(E, D, 21, dtype, False)
    bias = torch.randn(E, generator=_gen(22)) * 0.1
    V = 64
    tid2eid = torch.stack([torch.randperm(E, generator=_gen(30 + i))[:K] for i in range(V)])
    kw = dict(top_k=K, scoring_func=scoring, norm_topk_prob=scoring != "softmax", routed_scaling_factor=1.5,
              dtype=dtype)

    def run(mod):
        def f(v):
            x = rnd(v["x"], dtype)
            w, i = mod.gate(x, gate_w, None if hashed else bias, tid2eid if hashed else None, v["ids"], **kw)
            dense = torch.zeros(T, E).scatter(1, i, w)   # weights by expert id (order-free)
            # selection scores of the reference formula (binds the tie-aware comparator)
            sel = RM.score_fn(r_linear(x, gate_w, dtype).to(dtype), scoring).float()
            if not hashed:
                sel = sel + bias
            return {"indices": i, "weights_by_expert": dense, "sel": sel}
        return f

    wcmp = AllClose(rtol=1e-5, atol=1e-7) if dtype == F32 else AllClose(rtol=2 ** -7, atol=1e-7)
    return GoldenCase(f"gate/D{D}_E{E}_K{K}_T{T}_{str(dtype)[6:]}_{scoring}{'_hash' if hashed else ''}", [
        TensorSpec("x", (T, D), F32, Normal(seed=40 + T)),
        TensorSpec("ids", (T,), torch.int64, RandInt(0, V, seed=41)),
    ], run(RM), run(KM), {"indices": TopKTieAware("sel"), "weights_by_expert": wcmp,
                          "sel": AllClose(rtol=0, atol=0)})


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 8])
def test_gate_matches_reference(T, dtype):
    ok = True
    for scoring in ("sqrtsoftplus", "sigmoid", "softmax"):
        for hashed in (False, True):
            ok &= run_case(_gate_case(128, 8, 2, T, dtype, scoring, hashed)).passed
    ok &= run_case(_gate_case(4096, 256, 6, T, dtype, "sqrtsoftplus", False)).passed
    ok &= run_case(_gate_case(4096, 16, 6, T, dtype, "sqrtsoftplus", False)).passed
    ok &= run_case(_gate_case(96, 6, 3, T, dtype, "sigmoid", False)).passed
    assert ok


# --------------------------------------------------------------------------- moe
def _moe_case(dims: str, T: int, dtype: torch.dtype, quant: bool) -> GoldenCase:
    D, I, E, K = MOE_DIMS[dims]
    experts, shared = _moe_weights(dims, dtype, quant)
    gate_w = _weight(E, D, 21, dtype, False)
    bias = torch.randn(E, generator=_gen(22)) * 0.1

    def run(mod):
        def f(v):
            x = rnd(v["x"], dtype)
            w, i = RM.gate(x, gate_w, bias, None, v["ids"], top_k=K, scoring_func="sqrtsoftplus",
                           norm_topk_prob=True, routed_scaling_factor=1.5, dtype=dtype)
            return {"out": mod.moe(x, w, i, experts, shared, swiglu_limit=10.0, dtype=dtype)}
        return f

    return GoldenCase(f"moe/{dims}_T{T}_{str(dtype)[6:]}_{'w8a8' if quant else 'float'}", [
        TensorSpec("x", (T, D), F32, Normal(std=2.0, seed=50 + T)),
        TensorSpec("ids", (T,), torch.int64, RandInt(0, 64, seed=51)),
        TensorSpec("out", (T, D), F32, is_output=True),
    ], run(RM), run(KM), {"out": _cmp(dtype, quant)})


@pytest.mark.parametrize("quant", [False, True], ids=["float", "w8a8"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", ["mini", "odd", "flash"])
def test_moe_matches_reference(dims, dtype, quant):
    ok = True
    for T in (1, 8):
        ok &= run_case(_moe_case(dims, T, dtype, quant)).passed
    assert ok


def test_moe_small_limit_and_no_clamp():
    """swiglu_limit small enough to clamp many values, and 0 (clamps disabled)."""
    D, I, E, K = MOE_DIMS["odd"]
    x = torch.randn(5, D, generator=_gen(60)) * 3
    for dtype in (F32, BF16):
        for quant in (False, True):
            experts, shared = _moe_weights("odd", dtype, quant)
            xx = rnd(x, dtype)
            w, i = RM.gate(xx, _weight(E, D, 21, dtype, False), None, None, torch.arange(5), top_k=K,
                           scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0, dtype=dtype)
            for lim in (0.05, 0.0):
                a = RM.moe(xx, w, i, experts, shared, swiglu_limit=lim, dtype=dtype)
                b = KM.moe(xx, w, i, experts, shared, swiglu_limit=lim, dtype=dtype)
                assert _cmp(dtype, quant)(b, a).passed, (dtype, quant, lim)


def test_moe_expert_index_out_of_range_raises():
    """An expert id outside [0, E) in the routing indices is refused, never clamped."""
    D, I, E, K = MOE_DIMS["odd"]
    experts, shared = _moe_weights("odd", BF16, True)
    x = rnd(torch.randn(3, D, generator=_gen(61)), BF16)
    w = torch.full((3, K), 1.0 / K)
    for bad in (E, -1):
        i = torch.arange(3 * K).view(3, K) % E
        i[1, K - 1] = bad
        with pytest.raises(IndexError, match=f"expert index outside \\[0, {E}\\)"):
            KM.moe(x, w, i, experts, shared, swiglu_limit=0.0, dtype=BF16)


# --------------------------------------------------------------------------- norm / linear
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rms_norm_and_linear_match_reference(dtype):
    g = _gen(70)
    for T, D in ((1, 4096), (8, 4096), (3, 100)):
        x = rnd(torch.randn(T, D, generator=g) * 3, dtype)
        w = rnd(1 + 0.1 * torch.randn(D, generator=g), dtype)
        for weight in (w, None):
            a, b = r_rms_norm(x, weight, 1e-6, dtype), KN.rms_norm(x, weight, 1e-6, dtype)
            assert _float_cmp(dtype)(b, a).passed
        for N in (256, 130):
            wf = _weight(N, D, 71, dtype, False)
            wq = quantize_weight(wf)
            assert torch.equal(KL.linear(x, wf, dtype), r_linear(x, wf, dtype))   # same torch op
            # W8A8: bit-exact GEMM given identical INT8 inputs
            assert torch.equal(KL.linear(x, wq, dtype), r_linear(x, wq, dtype))
            assert torch.equal(KL.linear(x.view(T, 1, D), wq, dtype), r_linear(x.view(T, 1, D), wq, dtype))


def test_prepared_weights_match_unprepared():
    """Weights prepared at load (packed once, no raw int8 kept for the VNNI layout) give
    bitwise the results of the same weights packed per call; a prepared weight is still a
    QuantWeight whose qweight/scale/shape are the original ones."""
    from llm_kernels.kernels.common.prepared import PackedColumnGroups, PackedLinear, PackedRows
    from llm_kernels.kernels.deepseek_v4.output_proj import prepare_wo_b

    g = _gen(72)
    wq = quantize_weight(torch.randn(130, 96, generator=g))
    pl = KL.prepare_linear(wq)
    assert isinstance(pl, PackedLinear) and isinstance(pl, QuantWeight) and KL.prepare_linear(pl) is pl
    assert pl.shape == wq.shape and torch.equal(pl.qweight, wq.qweight) and torch.equal(pl.scale, wq.scale)
    import numpy as np

    # memory: the raw int8 tensor is not kept; the plain "nk" layout *is* the raw tensor (a view)
    assert all(v is not wq.qweight for v in vars(pl).values())
    assert np.shares_memory(pl.packed.data, wq.qweight.numpy()) == (pl.packed.layout == "nk")
    x = rnd(torch.randn(3, 96, generator=g), BF16)
    assert torch.equal(KL.linear(x, pl, BF16), KL.linear(x, wq, BF16))
    # wo_b: one packed slice per group
    H, HD, rd, G, OL, D = ATTN_DIMS["odd"]
    wo_a, wo_b = _attn_weights("odd", BF16, True)
    pw = prepare_wo_b(wo_b, G)
    assert isinstance(pw, PackedColumnGroups) and len(pw.packs) == G and torch.equal(pw.qweight, wo_b.qweight)
    o = rnd(torch.randn(2, H, HD, generator=g), BF16)
    assert torch.equal(KA.grouped_output_proj(o, wo_a, pw, o_groups=G, dtype=BF16),
                       KA.grouped_output_proj(o, wo_a, wo_b, o_groups=G, dtype=BF16))
    # experts: [w1; w3] packed together, w2 alone
    D, I, E, K = MOE_DIMS["odd"]
    ws = tuple(quantize_weight(torch.randn(*s, generator=g) * 0.1) for s in ((I, D), (I, D), (D, I)))
    pe = KM.prepare_expert(*ws)
    assert all(isinstance(w, PackedRows) for w in pe) and pe[0].group is pe[1].group is pe[2].group
    assert all(torch.equal(a.qweight, b.qweight) for a, b in zip(pe, ws)) and KM.prepare_expert(*pe) == pe
    xe = rnd(torch.randn(4, D, generator=g), BF16)
    wi = torch.rand(4, 1, generator=g)
    ii = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(KM.moe(xe, wi, ii, [pe], pe, swiglu_limit=0.0, dtype=BF16),
                       KM.moe(xe, wi, ii, [ws], ws, swiglu_limit=0.0, dtype=BF16))


# --------------------------------------------------------------------------- determinism
def _with_threads(fn, numba_threads: int, torch_threads: int):
    nb, tt = numba.get_num_threads(), torch.get_num_threads()
    try:
        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(torch_threads)
        return fn()
    finally:
        numba.set_num_threads(nb)
        torch.set_num_threads(tt)


def _all_stages(T: int, dtype: torch.dtype, quant: bool):
    """A closure running every fused function at Flash dims (experts: Flash E=16 for W8A8,
    mini for float weights to keep memory small) and returning all outputs."""
    H, HD, rd, G, OL, D = ATTN_DIMS["flash"]
    N, idx = _attn_layout(T, 128, 1024, 512, seed=5)
    g = _gen(80)
    q, pool = rnd(torch.randn(T, H, HD, generator=g), dtype), rnd(torch.randn(N, HD, generator=g), dtype)
    sink = torch.randn(H, generator=g)
    cos, sin = rope_cos_sin(preset("mini").rope_main, rd, torch.arange(T), dtype)
    wo_a, wo_b = _attn_weights("flash", dtype, quant)
    md = "flash" if quant else "mini"
    Dm, I, E, K = MOE_DIMS[md]
    experts, shared = _moe_weights(md, dtype, quant)
    x = rnd(torch.randn(T, Dm, generator=g), dtype)
    gate_w = _weight(E, Dm, 21, dtype, False)
    wl = _weight(256, Dm, 23, dtype, quant)

    def run():
        a = KA.sparse_attn(q, pool, idx, sink, cos, sin, wo_a, wo_b, o_groups=G, softmax_scale=HD ** -0.5,
                           dtype=dtype)
        w, i = KM.gate(x, gate_w, None, None, torch.arange(T), top_k=K, scoring_func="sqrtsoftplus",
                       norm_topk_prob=True, routed_scaling_factor=1.5, dtype=dtype)
        m = KM.moe(x, w, i, experts, shared, swiglu_limit=10.0, dtype=dtype)
        return a, w, i, m, KN.rms_norm(x, None, 1e-6, dtype), KL.linear(x, wl, dtype)

    return run


@pytest.mark.parametrize("dtype,quant", [(BF16, True), (F32, True), (BF16, False), (F32, False)],
                         ids=["bf16_w8a8", "fp32_w8a8", "bf16_float", "fp32_float"])
def test_deterministic_across_numba_threads(dtype, quant):
    """Every Numba loop owns its outputs and has no parallel float reduction: bitwise equal
    results with 1 and 2 Numba threads (torch threads fixed)."""
    run = _all_stages(8, dtype, quant)
    tt = torch.get_num_threads()
    r1, r2 = _with_threads(run, 1, tt), _with_threads(run, 2, tt)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,quant", [(BF16, True), (BF16, False)], ids=["bf16_w8a8", "bf16_float"])
def test_deterministic_across_torch_threads(dtype, quant):
    """The torch calls inside the kernels (bmm for QK/PV, bf16 F.linear for the router and
    float experts; oneDNN) gave bitwise equal results with 1 and 2 torch threads. Not
    asserted for float32 *float* weights: MKL's fp32 sgemm (torch ``F.linear`` fp32, also
    used by the reference) depends on the thread count for some row counts — observed for
    M = 5 rows at every N, K tried (M = 1, 2, 3, 8 were stable) — and float32 mode runs the
    router logits (and the float experts / wo_b) through it, so float32 runs are only
    Numba-thread deterministic. T = 5 is the row count that exposes it."""
    run = _all_stages(5, dtype, quant)
    nb = numba.get_num_threads()
    r1, r2 = _with_threads(run, nb, 1), _with_threads(run, nb, 2)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    from llm_kernels.checkpoint import write_random_checkpoint

    d = tmp_path_factory.mktemp("ckpt_mini_attn_moe")
    write_random_checkpoint(preset("mini"), d, seed=0, dtype=torch.bfloat16, progress=False)
    return d


def _engine_logits(ckpt, dtype, quant, backend, ids, prefill=40):
    from llm_kernels.checkpoint import load_checkpoint
    from llm_kernels.runtime.deepseek_v4.stages import stages as get_ops
    from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine

    cfg, w = load_checkpoint(ckpt, dtype=dtype, quant=quant, progress=False)
    eng = DeepSeekV4Engine(w, cfg, dtype=dtype, max_seq_len=len(ids) + 8, ops=get_ops(backend))
    (sid,), (lg,) = eng.prefill([ids[:prefill]])
    rows = [lg]
    for t in ids[prefill:]:
        (o,) = eng.decode([sid], [t])
        rows.append(o)
    return torch.cat(rows)


# Observed (40-token prefill + 20 decode steps, mini checkpoint, every stage fused that has a
# kernel, including the other engineers' hc / qkv / compressor / indexer kernels):
# * fp32 float: max abs 3.1e-6 .. 3.8e-6 on logits of max |.| 4.1 .. 4.7: fp32 summation
#   order only (wo_a GEMV, gathered attention, other stages), ~300x below the 1e-3 bound;
# * bf16 W8A8: bit-identical logits (torch.equal) on both tiers of this machine (VNNI +
#   BF16 and LLM_KERNELS_FORCE_FALLBACK=1), so equality is asserted. Why it can be exact: the
#   INT8 GEMMs are exact INT32 sums with the reference's fp32 dequant, the softmax is
#   bit-exact, and the fp32 sums whose order differs (wo_a, PV) rounded to the same bf16
#   value everywhere on this input. If a kernel change makes one of them round to the
#   other bf16 neighbour, no tight bound exists to fall back to: a single flip is amplified
#   by the random model, and a flip that changes an INT8 activation step or a router /
#   indexer top-k decision moves a whole row (test_fused_decode_prefill.py observed row
#   cosines down to 0.88) -- investigate, do not just loosen;
# * (fp32 W8A8, not run to keep the file fast: max abs 2.2e-6, cosine 1 - 1e-12.)
@pytest.mark.parametrize("dtype,quant", [(F32, None), (BF16, "w8a8")], ids=["fp32_float", "bf16_w8a8"])
def test_engine_fused_vs_reference(mini_checkpoint, dtype, quant):
    ids = torch.randint(0, 512, (60,), generator=_gen(90)).tolist()
    ref = _engine_logits(mini_checkpoint, dtype, quant, "reference", ids)
    fused = _engine_logits(mini_checkpoint, dtype, quant, "fused", ids)
    assert torch.isfinite(fused).all()
    diff = (fused - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(fused.flatten().double(), ref.flatten().double(), dim=0).item()
    print(f"engine {dtype} {quant}: max abs {diff:.3g} (logit scale {ref.abs().max().item():.3g}), cosine {cos:.10f}")
    if quant is None:
        assert diff <= 1e-3
    else:
        assert torch.equal(fused, ref), f"bf16 W8A8 logits no longer bit-identical (max abs {diff:.3g}, cos {cos:.10f})"


# --------------------------------------------------------------------------- benchmark
def _cpu_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]            # busy jiffies of the whole machine


def _own_jiffies() -> int:
    import os

    with open(f"/proc/{os.getpid()}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])      # utime + stime of all our threads


def _others_busy(seconds: float) -> float:
    """Fraction of the machine's CPU capacity used by *other* processes over ``seconds``."""
    import os
    import time

    t0, o0, w0 = _cpu_jiffies(), _own_jiffies(), time.monotonic()
    time.sleep(seconds)
    t1, o1, w1 = _cpu_jiffies(), _own_jiffies(), time.monotonic()
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, (t1 - t0) - (o1 - o0)) / (hz * (w1 - w0) * os.cpu_count())


def _wait_quiet(max_wait: float = 120.0, limit: float = 0.05) -> float:
    """Wait until other processes use < ``limit`` of the CPUs for 1 s (other engineers
    share this 2-core VM: one busy foreign process stalls every OpenMP barrier by a
    scheduler time slice, turning 1 ms kernels into 100+ ms). Returns the last reading."""
    import time

    t_end = time.monotonic() + max_wait
    while True:
        busy = _others_busy(1.0)
        if busy < limit or time.monotonic() > t_end:
            return busy


def bench_main(repeats: int = 7) -> list[dict]:
    """Reference vs fused at Flash dims, T in {1, 8}: median of ``repeats`` interleaved runs
    after warm-up (compile and packing excluded), DRAM bandwidth measured in the same run.
    Weight bytes are those the fused kernel streams (bf16 wo_a + int8 wo_b, int8 experts,
    bf16 gate_w). Each row is measured when the machine is quiet and re-measured (up to 3
    times) if other processes used > 10 % of the CPUs meanwhile ("busy" column)."""
    import time

    from llm_kernels.bench.core import interleaved, measure_dram_bandwidth, print_table

    torch.manual_seed(0)
    rows = []
    H, HD, rd, G, OL, D = ATTN_DIMS["flash"]
    _wait_quiet()
    bw = measure_dram_bandwidth()
    print(f"DRAM read bandwidth (torch.sum, same run): {bw:.1f} GB/s", flush=True)

    def add(name, T, fns, nbytes):
        for _ in range(3):
            _wait_quiet()
            t0, o0, w0 = _cpu_jiffies(), _own_jiffies(), time.monotonic()
            res = interleaved(fns, repeats=repeats, warmup=2)
            import os
            busy = max(0.0, (_cpu_jiffies() - t0) - (_own_jiffies() - o0)) / (
                os.sysconf("SC_CLK_TCK") * (time.monotonic() - w0) * os.cpu_count())
            if busy <= 0.10:
                break
        r, f = res["reference"].median_s, res["fused"].median_s
        row = {"op": name, "T": T, "ref ms": r * 1e3, "fused ms": f * 1e3, "speed-up": r / f,
               "weight MB": nbytes / 1e6 if nbytes else None,
               "fused GB/s": nbytes / f / 1e9 if nbytes else None,
               "% roofline": 100 * nbytes / f / 1e9 / bw if nbytes else None, "busy %": 100 * busy}
        rows.append(row)
        print(row, flush=True)

    # sparse_attn (bf16, W8A8 wo_b) and its output projection alone
    wo_a = _weight(G * OL, H // G * HD, 11, BF16, False)
    wo_b = _weight(D, G * OL, 12, BF16, True)
    cos_all, sin_all = rope_cos_sin(preset("mini").rope_main, rd, torch.arange(8) + 1000, BF16)
    proj_bytes = wo_a.numel() * 2 + wo_b.qweight.numel()
    from llm_kernels.kernels.deepseek_v4.output_proj import prepare_wo_b

    wo_b_p = prepare_wo_b(wo_b, G)            # the fused kernel reads the weight prepared at load
    for T in (1, 8):
        N, idx = _attn_layout(T, 128, 1024, 512, seed=T)
        q = rnd(torch.randn(T, H, HD), BF16)
        pool = rnd(torch.randn(N, HD), BF16)
        sink = torch.randn(H)
        cos, sin = cos_all[:T], sin_all[:T]
        args = (q, pool, idx, sink, cos, sin, wo_a, wo_b)
        fargs = args[:-1] + (wo_b_p,)
        kw = dict(o_groups=G, softmax_scale=HD ** -0.5, dtype=BF16)
        add("sparse_attn bf16 W8A8 (W=640)", T, {"reference": lambda: RA.sparse_attn(*args, **kw),
                                                 "fused": lambda: KA.sparse_attn(*fargs, **kw)}, proj_bytes)
        o = rnd(torch.randn(T, H, HD), BF16)
        add("  grouped_output_proj alone", T,
            {"reference": lambda: RA.grouped_output_proj(o, wo_a, wo_b, o_groups=G, dtype=BF16),
             "fused": lambda: KA.grouped_output_proj(o, wo_a, wo_b_p, o_groups=G, dtype=BF16)}, proj_bytes)
    _base_weight.cache_clear()
    _quant_weight.cache_clear()
    wo_a = wo_b = wo_b_p = None               # free the attention weights

    # gate (E=256) and moe (E=256 W8A8 experts + shared), bf16
    E, K, I = 256, 6, 2048
    gate_w = (torch.randn(E, D) * D ** -0.5).to(BF16)
    bias = torch.randn(E) * 0.1
    gkw = dict(top_k=K, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, dtype=BF16)

    def qexpert(o, i):
        return QuantWeight(torch.randint(-127, 128, (o, i), dtype=torch.int8), torch.rand(o) * 1e-3 + 1e-3)

    experts = [(qexpert(I, D), qexpert(I, D), qexpert(D, I)) for _ in range(E)]
    shared = (qexpert(I, D), qexpert(I, D), qexpert(D, I))
    t0 = time.perf_counter()
    p_experts = [KM.prepare_expert(*ws) for ws in experts]    # prepared at load, like the engine
    p_shared = KM.prepare_expert(*shared)
    print(f"packed {E + 1} experts in {time.perf_counter() - t0:.1f} s", flush=True)
    expert_bytes = 3 * I * D
    for T in (1, 8):
        x = rnd(torch.randn(T, D), BF16)
        add("gate E=256 bf16", T, {"reference": lambda: RM.gate(x, gate_w, bias, None, torch.arange(T), **gkw),
                                   "fused": lambda: KM.gate(x, gate_w, bias, None, torch.arange(T), **gkw)},
            gate_w.numel() * 2)
        w, i = RM.gate(x, gate_w, bias, None, torch.arange(T), **gkw)
        n_act = int(torch.unique(i).numel()) + 1
        add(f"moe W8A8 E=256 bf16 ({n_act - 1}+1 experts)", T,
            {"reference": lambda: RM.moe(x, w, i, experts, shared, swiglu_limit=10.0, dtype=BF16),
             "fused": lambda: KM.moe(x, w, i, p_experts, p_shared, swiglu_limit=10.0, dtype=BF16)},
            n_act * expert_bytes)
        y = rnd(torch.randn(T, D), BF16)
        gn = rnd(1 + 0.1 * torch.randn(D), BF16)
        add("rms_norm D=4096 bf16", T, {"reference": lambda: r_rms_norm(y, gn, 1e-6, BF16),
                                        "fused": lambda: KN.rms_norm(y, gn, 1e-6, BF16)}, 0)
        # linear W8A8 on rotating copies (8 x 64 MiB > 16x L3: streamed from DRAM)
        lins = [qexpert(16384, D) for _ in range(8)]
        p_lins = [KL.prepare_linear(lw) for lw in lins]    # prepared at load
        j = [0, 0]

        def ref_lin():
            j[0] = (j[0] + 1) % 8
            return r_linear(y, lins[j[0]], BF16)

        def fused_lin():
            j[1] = (j[1] + 1) % 8
            return KL.linear(y, p_lins[j[1]], BF16)

        add("linear W8A8 16384x4096 bf16", T, {"reference": ref_lin, "fused": fused_lin}, 16384 * D)
        lins = p_lins = None
    experts = p_experts = p_shared = None
    _wait_quiet()
    bw2 = measure_dram_bandwidth()
    print(f"DRAM read bandwidth after the run: {bw2:.1f} GB/s")
    print_table(rows, title=f"Flash dims, median of {repeats}; roofline at {bw:.1f} GB/s")
    return rows


@pytest.mark.slow
def test_bench():
    bench_main()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        bench_main(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
    else:
        raise SystemExit(pytest.main([__file__, "-v"]))
