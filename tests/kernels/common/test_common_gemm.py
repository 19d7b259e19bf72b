"""W8A8 GEMM: exact int32 accumulators and bitwise fp32 outputs vs the golden, both paths."""

from __future__ import annotations

import numba
import numpy as np
import kernel_tiers as KT
import pytest
import torch

from llm_kernels.harness import AllClose, GoldenCase, Normal, TensorSpec, run_case
from llm_kernels.kernels.common import gemm as G
from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.quant import quant_rows
from llm_kernels.numerics.quant import int8_matmul, quant_per_row, quantize_weight, w8a8_linear

SHAPES = [(128, 64), (100, 37), (7168, 64), (4096, 33)]  # (K, N)
TOKENS = [1, 2, 4, 8, 16]
PATHS = ["vnni", "fallback"]
#: The process's register-tile layout: "vnni", or "avx2" (an AVX2-only CPU, or the whole run
#: under LLM_KERNELS_TIER=avx2); the "vnni" path key below means "the register-tile kernel".
TILE = jit.INT8_TILE or "vnni"
needs_vnni = pytest.mark.skipif(jit.INT8_TILE is None, reason=KT.need_reason("avx2", "for a register-tile GEMM"))

_PACK_CACHE: dict = {}


def _qweight(K, N):
    key = (K, N)
    if key not in _PACK_CACHE:
        g = torch.Generator().manual_seed(K * 1000 + N)
        qw = quantize_weight(torch.randn(N, K, generator=g) * 0.05)
        packs = {"fallback": G.pack_w8a8(qw.qweight, qw.scale, "nk")}
        if jit.INT8_TILE:
            packs["vnni"] = G.pack_w8a8(qw.qweight, qw.scale, TILE)
        _PACK_CACHE[key] = (qw, packs)
    return _PACK_CACHE[key]


def _gemm_case(T, K, N, path):
    qw, packs = _qweight(K, N)
    pw = packs[path]

    def golden(v):
        q, _ = quant_per_row(v["x"])
        return {"acc": int8_matmul(q, qw.qweight), "y": w8a8_linear(v["x"], qw)}

    def impl(v):
        q, s = quant_rows(v["x"])
        if path == "vnni":
            acc, y = G.w8a8_gemm_i32_vnni(q, pw), G.w8a8_gemm_vnni(q, s, pw)
        else:  # the plain kernels called directly, on the raw [N, K] weight
            acc = G.w8a8_gemm_i32_fallback(q, qw.qweight)
            y = G.w8a8_gemm_fallback(q, s, qw.qweight, qw.scale)
        return {"acc": torch.from_numpy(acc), "y": torch.from_numpy(y)}

    return GoldenCase(
        name=f"w8a8_gemm/{path}/T{T}_K{K}_N{N}",
        inputs=[TensorSpec("x", (T, K), torch.float32, Normal(std=1.0, seed=T * 7 + K + N)),
                TensorSpec("acc", (T, N), torch.int32, is_output=True),
                TensorSpec("y", (T, N), torch.float32, is_output=True)],
        golden=golden, impl=impl,
        comparators={"acc": AllClose(0, 0), "y": AllClose(0, 0)})


@pytest.mark.parametrize("path", [pytest.param("vnni", marks=needs_vnni), "fallback"])
@pytest.mark.parametrize("K,N", SHAPES)
def test_gemm_exact_vs_golden(path, K, N):
    for T in TOKENS:
        res = run_case(_gemm_case(T, K, N, path))
        assert res.passed, res.outputs


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("layout", [pytest.param(TILE, marks=needs_vnni), "nk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_fused_bitwise(layout, dtype):
    """Fused quant + GEMM + dequant == golden w8a8_linear, for fp32 and bf16 activations,
    [..., K] inputs, numpy and torch inputs, and token counts taking every tile path."""
    qw, _ = _qweight(100, 37)
    lin = G.W8A8Linear.from_quant_weight(qw, layout)
    assert lin.layout == layout and lin.in_features == 100 and lin.out_features == 37
    g = torch.Generator().manual_seed(5)
    for T in (1, 3, 5, 7, 13, 16, 17, 40):
        x = (torch.randn(T, 100, generator=g) * 3).to(dtype)
        ref = w8a8_linear(x, qw)
        y = lin(x)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        assert (_bits(y) == _bits(ref)).all(), (T, dtype)
    x3 = torch.randn(2, 3, 100, generator=g).to(dtype)
    y3 = lin(x3)
    assert y3.shape == (2, 3, 37) and (_bits(y3) == _bits(w8a8_linear(x3, qw))).all()
    xn = x3.reshape(6, 100)
    xn = xn.numpy() if dtype == torch.float32 else xn.view(torch.int16).numpy().view(np.uint16)
    yn = lin(xn)
    assert isinstance(yn, np.ndarray) and (_bits(yn) == _bits(y3.reshape(6, 37))).all()


@needs_vnni
def test_vnni_multi_tile_and_odd_tokens():
    """T > 16 (K-blocked multi-tile path), padded tile heights, K % 4 != 0 and N % 64 != 0."""
    for K, N in [(4100, 70), (3, 5)]:
        qw, packs = _qweight(K, N)
        g = torch.Generator().manual_seed(K)
        for T in (7, 9, 13, 17, 31, 33):
            q = torch.randint(-127, 128, (T, K), generator=g, dtype=torch.int8)
            ref = int8_matmul(q, qw.qweight).numpy()
            assert (G.w8a8_gemm_i32_vnni(q, packs["vnni"]) == ref).all(), (K, N, T)


def test_extreme_values_exact():
    """All-±127 operands: the largest |acc| (K·127²) stays exact in int32."""
    K, N, T = 7168, 20, 3
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = -127
    w[2] = -128  # (a weight may be -128; activations from the quantiser never are)
    q = torch.full((T, K), -127, dtype=torch.int8)
    q[1] = 127
    ref = int8_matmul(q, w).numpy()
    assert (G.w8a8_gemm_i32_fallback(q, w) == ref).all()
    if jit.INT8_TILE:
        pw = G.pack_w8a8(w, torch.ones(N), TILE)
        assert (G.w8a8_gemm_i32_vnni(q, pw) == ref).all()


def test_determinism_repeat_and_threads():
    qw, _ = _qweight(4096, 33)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 4096, generator=g)
    layouts = ["nk"] + ([TILE] if jit.INT8_TILE else [])
    nmax = min(2, numba.config.NUMBA_NUM_THREADS)
    old = numba.get_num_threads()
    try:
        for layout in layouts:
            lin = G.W8A8Linear.from_quant_weight(qw, layout)
            numba.set_num_threads(nmax)
            ref = _bits(lin(x))
            for _ in range(3):
                assert (_bits(lin(x)) == ref).all()
            numba.set_num_threads(1)
            assert (_bits(lin(x)) == ref).all()
    finally:
        numba.set_num_threads(old)


def test_dispatch_and_pack_api():
    qw, _ = _qweight(128, 64)
    p = G.pack_w8a8(qw.qweight, qw.scale)
    assert p.layout == (jit.INT8_TILE if jit.USE_INT8_TILES else "nk")
    assert p.n == 64 and p.k == 128 and p.wsum.dtype == np.int32
    assert (p.wsum == qw.qweight.numpy().astype(np.int64).sum(1)).all()
    q, s = quant_rows(torch.randn(2, 128))
    assert (G.w8a8_gemm_i32(q, p) == int8_matmul(torch.from_numpy(q), qw.qweight).numpy()).all()
    y = G.w8a8_gemm(q, s, p)
    assert y.shape == (2, 64) and y.dtype == np.float32
    if jit.INT8_TILE:
        pv = G.pack_w8a8(qw.qweight, qw.scale, TILE)
        assert pv.kp % 4 == 0 and pv.np_ % 64 == 0 and pv.data.ctypes.data % 64 == 0
    # zero tokens
    assert G.w8a8_gemm(np.zeros((0, 128), np.int8), np.zeros(0, np.float32), p).shape == (0, 64)


def test_gemm_errors():
    qw, packs = _qweight(128, 64)
    pn = packs["fallback"]
    q = np.zeros((2, 128), np.int8)
    with pytest.raises(TypeError):
        G.w8a8_gemm(q.astype(np.int16), np.ones(2, np.float32), pn)
    with pytest.raises(ValueError):
        G.w8a8_gemm(np.zeros((2, 127), np.int8), np.ones(2, np.float32), pn)
    with pytest.raises(ValueError):
        G.w8a8_gemm(q, np.ones(3, np.float32), pn)
    with pytest.raises(ValueError):
        G.pack_w8a8(qw.qweight, qw.scale, "bogus")
    with pytest.raises(ValueError):
        G.pack_w8a8(qw.qweight, qw.scale[:3])
    with pytest.raises(TypeError):
        G.pack_w8a8(qw.qweight.float(), qw.scale)
    with pytest.raises(ValueError):
        G.w8a8_gemm_vnni(q, np.ones(2, np.float32), pn)  # wrong layout for the VNNI kernel
    with pytest.raises(ValueError):
        G.W8A8Linear.from_quant_weight(qw, "nk")(torch.zeros(2, 100))
    if jit.INT8_TILE:
        with pytest.raises(ValueError):
            G.w8a8_gemm_fallback(q, np.ones(2, np.float32), packs["vnni"])
        with pytest.raises(ValueError):
            G.pack_w8a8(np.zeros((1, 70_000), np.int8), np.ones(1, np.float32), TILE)
        other = "avx2" if TILE == "vnni" else "vnni"  # one tile kind per process
        with pytest.raises(RuntimeError, match=f"layout='{other}'"):
            G.pack_w8a8(qw.qweight, qw.scale, other)
