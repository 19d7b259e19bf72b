"""The AVX2 tier (``common/x86_avx2.py``).

* In this process (any tier, the CPU needs AVX2): the sign-folded register tile compiled
  straight from :func:`avx2_bcast_tile` vs exact numpy products — every tile shape the
  kernels use, offsets, accumulate on/off, and the saturation corner (|q| = 127 against
  |w| = 127 and w = -128 everywhere: pair sums 32258 / 32512, just below int16's 32767).
* In ONE fresh process under ``LLM_KERNELS_TIER=avx2`` (the kernels pick their tile at
  import, so the whole package must run there): the GEMM bitwise vs the golden for
  T in {1..8, 12, 16, 17, 33}, odd K and N, extreme values, fused ``w8a8_linear``; and every
  consumer of the INT8 tiles (DeepSeek per-head ``qkv_proj_rope`` / indexer query, keys and
  scores, MoE; Qwen3 qkv / o_proj / gate-up / down stages) bitwise equal to this process's
  results (whatever tier it runs: all tiers compute the exact int32 products).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernel_tiers as KT
import numba
import numpy as np
import pytest
import torch

from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.gemm import TILE_HEIGHTS, nb_for
from llm_kernels.kernels.common.x86_avx2 import (
    AVX2_REGS,
    avx2_bcast_tile,
    avx2_plan,
    int8_bcast_tile,
)

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
F32, BF16 = torch.float32, torch.bfloat16
needs_avx2 = KT.needs_cpu("avx2", "to compile the AVX2 tile")

#: (tokens, 16-channel blocks) of every tile the kernels build: the GEMM's heights, the
#: per-head tiles (1 block) and the indexer's 4 x 4, plus odd extras.
KERNEL_TILES = sorted({(t, nb_for(t)) for t in TILE_HEIGHTS} | {(t, 1) for t in (1, 2, 4, 8, 16)} | {(4, 4)})


def _pack_w(w: np.ndarray, kg: int) -> np.ndarray:
    """int8 [16·nb, 4·kg] -> the broadcast layout [nb][kg][16][4]."""
    nb = w.shape[0] // 16
    return np.ascontiguousarray(w.reshape(nb, 16, kg, 4).transpose(0, 2, 1, 3)).reshape(-1)


def _pack_x(q: np.ndarray, kg: int) -> np.ndarray:
    """int8 [T, 4·kg] -> the AVX2 tile's activation bytes (the signed ``q``, as u8 bits) in
    the [kg][T][4] layout."""
    T = q.shape[0]
    u = np.ascontiguousarray(q).view(np.uint8)
    return np.ascontiguousarray(u.reshape(T, kg, 4).transpose(1, 0, 2)).reshape(-1)


def _runner(tt: int, nb: int, prefetch: int = 0):
    tile = avx2_bcast_tile(tt, nb, prefetch)

    @numba.njit(cache=False)
    def run(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum):
        tile(xp, x_off, xks, wp, w_off, wbs, nkg, acc, a_off, ats, accum)

    return run


def _check_tile(tt, nb, q, w, prefetch=0):
    kg = q.shape[1] // 4
    run = _runner(tt, nb, prefetch)
    xp = np.concatenate([np.full(8, 7, np.uint8), _pack_x(q, kg)])           # x_off = 8
    wp = np.concatenate([np.full(64, 3, np.int8), _pack_w(w, kg)])           # w_off = 64
    ats = nb * 16 + 5                                                         # padded rows
    acc = np.full(3 + tt * ats, 11, np.int32)                                # a_off = 3
    ref = q.astype(np.int64) @ w.astype(np.int64).T
    run(xp, 8, tt * 4, wp, 64, kg * 64, kg, acc, 3, ats, True)
    got = acc[3:].reshape(tt, ats)
    assert (got[:, :nb * 16] == ref + 11).all(), (tt, nb, "accumulate")
    assert (got[:, nb * 16:] == 11).all() and acc[:3].tolist() == [11] * 3  # nothing else written
    run(xp, 8, tt * 4, wp, 64, kg * 64, kg, acc, 3, ats, False)
    assert (acc[3:].reshape(tt, ats)[:, :nb * 16] == ref).all(), (tt, nb, "overwrite")


@needs_avx2
@pytest.mark.parametrize("tt,nb", KERNEL_TILES + [(3, 2), (7, 3), (17, 1), (33, 2)])
def test_avx2_tile_exact(tt, nb):
    """Random operands (weights over all of int8, -128 included; activations in [-127, 127])."""
    rng = np.random.default_rng(tt * 100 + nb)
    kg = 37
    w = rng.integers(-128, 128, (16 * nb, 4 * kg)).astype(np.int8)
    q = rng.integers(-127, 128, (tt, 4 * kg)).astype(np.int8)
    _check_tile(tt, nb, q, w, prefetch=256 if tt > 2 else 0)


@needs_avx2
def test_avx2_tile_saturation_corner():
    """|q| = 127 everywhere against w = ±127 and -128: the largest vpmaddubsw pair sums
    (2·127·127 = 32258, 2·128·127 = 32512) and the largest int32 sums stay exact."""
    kg = 1792  # K = 7168
    w = np.full((64, 4 * kg), 127, np.int8)
    w[1::2] = -127
    w[2::4] = -128
    w[3, ::2] = 0  # zero weights: vpsignb gives 0
    q = np.full((4, 4 * kg), -127, np.int8)
    q[1] = 127
    q[2, ::2] = 127
    _check_tile(4, 4, q, w)
    _check_tile(1, 4, q[:1], w)


def test_avx2_plan_fits_the_registers():
    """Every kernel tile's plan covers each (token, ymm half) exactly once, with
    accumulators + weight registers within AVX2_REGS (13 of the 16 ymm: no spill in the k
    loops compiled for znver3)."""
    for tt, nb in KERNEL_TILES + [(33, 2), (64, 16)]:
        seen = []
        for t0, ts, h0, hs in avx2_plan(tt, nb):
            assert ts * hs + (2 * hs if ts > 1 else 3) <= AVX2_REGS or hs == 1, (tt, nb, ts, hs)
            assert ts + 2 <= AVX2_REGS
            seen += [(t, h) for t in range(t0, t0 + ts) for h in range(h0, h0 + hs)]
        assert sorted(seen) == [(t, h) for t in range(tt) for h in range(2 * nb)], (tt, nb)
    assert avx2_plan(1, 4) == [(0, 1, 0, 8)]  # decode: one pass streams the 64 channels once
    with pytest.raises(ValueError):
        avx2_bcast_tile(0, 1)


def test_seam_hands_out_the_process_tile():
    """``int8_bcast_tile`` is the one place choosing the tile: the AVX2 one iff the process's
    INT8 tile is "avx2" (nothing is compiled here)."""
    name = int8_bcast_tile(4, 4, 0).__name__
    assert name.startswith("avx2_" if jit.INT8_TILE == "avx2" else "vnni_"), (name, jit.INT8_TILE)


# --------------------------------------------------------------------------- the avx2 process
def gemm_checks() -> int:
    """GEMM checks against the golden in this process's tier (run in the avx2 child).
    Returns the number of cases."""
    from llm_kernels.kernels.common import gemm as G
    from llm_kernels.numerics.quant import (
        int8_matmul,
        quant_per_row,
        quantize_weight,
        w8a8_linear,
    )

    def bits(a):
        a = a.numpy() if isinstance(a, torch.Tensor) else a
        return np.ascontiguousarray(a).view(np.uint32)

    n = 0
    g = torch.Generator().manual_seed(11)
    for K, N in [(128, 64), (100, 37), (4100, 70), (3, 5), (257, 129), (7168, 20)]:
        qw = quantize_weight(torch.randn(N, K, generator=g) * 0.05)
        pw = G.pack_w8a8(qw.qweight, qw.scale)
        assert pw.layout == jit.INT8_TILE and (pw.wsum128 == 0).all() == (pw.layout == "avx2"), pw
        for T in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 33):
            x = torch.randn(T, K, generator=g) * 3
            q, s = quant_per_row(x)
            assert (G.w8a8_gemm_i32(q, pw) == int8_matmul(q, qw.qweight).numpy()).all(), (K, N, T)
            ref = w8a8_linear(x, qw)
            assert (bits(G.w8a8_gemm(q, s, pw)) == bits(ref)).all(), (K, N, T)
            assert (bits(G.w8a8_linear(x, pw)) == bits(ref)).all(), (K, N, T)
            xb = x.to(BF16)
            assert (bits(G.w8a8_linear(xb, pw)) == bits(w8a8_linear(xb, qw))).all(), (K, N, T)
            n += 1
    # extremes: q = ±127 against w = ±127 / -128 (saturation corner of vpmaddubsw), K = 7168
    K, N = 7168, 70
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = -127
    w[2::4] = -128
    for T in (1, 5, 16, 17):
        q = torch.full((T, K), -127, dtype=torch.int8)
        q[1::2] = 127
        pw = G.pack_w8a8(w, torch.ones(N))
        assert (G.w8a8_gemm_i32(q, pw) == int8_matmul(q, w).numpy()).all(), T
        n += 1
    if jit.INT8_TILE == "avx2":  # the quantiser never makes -128; the raw-int8 API refuses it
        with pytest.raises(ValueError, match="-127, 127"):
            G.w8a8_gemm_i32(torch.full((1, K), -128, dtype=torch.int8), pw)
    return n


def _q(shape, g, scale=0.05):
    from llm_kernels.numerics.quant import quantize_weight

    return quantize_weight(torch.randn(*shape, generator=g) * scale)


def consumer_outputs() -> dict[str, torch.Tensor]:
    """Outputs of every consumer of the INT8 register tiles on fixed inputs (W8A8 weights),
    for comparing tiers: all are exact int32 products + the same fp32 epilogues."""
    from llm_kernels.kernels.deepseek_v4 import indexer as KI
    from llm_kernels.kernels.deepseek_v4 import moe as DM
    from llm_kernels.kernels.deepseek_v4 import qkv_proj_rope as DQ
    from llm_kernels.kernels.qwen3 import mlp as QM
    from llm_kernels.kernels.qwen3 import o_proj as QO
    from llm_kernels.kernels.qwen3 import qkv_proj as QQ
    from llm_kernels.models import preset
    from llm_kernels.reference.deepseek_v4.common import rope_cos_sin

    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(4)
    # DeepSeek: per-head wq_b (qkv_proj_rope), indexer query / keys / scores
    D, H, HD, RD, QL, IH, IHD = 256, 4, 64, 16, 128, 8, 32
    qw, iqw = _q((H * HD, QL), g, 1 / 11), _q((IH * IHD, QL), g, 1 / 11)
    wa, wkv, wp = (torch.randn(s, generator=g) / 16 for s in ((QL, D), (HD, D), (IH, D)))
    keys = torch.randn(77, IHD, generator=g)
    rope = preset("flash").rope_compress
    for T in (1, 5, 17):
        x = torch.randn(T, D, generator=g)
        for dt in (F32, BF16):
            cos, sin = rope_cos_sin(rope, RD, torch.arange(T), dt)
            q, kv, qr = DQ.qkv_proj_rope(x, wa, torch.ones(QL), qw, wkv, torch.ones(HD), cos, sin, num_heads=H,
                                         head_dim=HD, eps=1e-6, dtype=dt)
            q8, qs, w = KI.indexer_query_int8(qr, x, iqw, wp, cos, sin, n_heads=IH, head_dim=IHD, dtype=dt)
            k8, ks = KI.indexer_keys_int8(keys)
            sc = KI.indexer_scores_int8(q8, qs, w, k8, ks)
            for k, v in {"q": q, "kv": kv, "qr": qr, "q8": q8, "qs": qs, "w": w, "scores": sc}.items():
                out[f"dsv4/T{T}/{dt}/{k}"] = v
    # DeepSeek MoE: routed + shared experts through the common pre-packed GEMM
    Dm, I, E, K = 96, 80, 6, 2
    experts = [(_q((I, Dm), g), _q((I, Dm), g), _q((Dm, I), g)) for _ in range(E)]
    shared = (_q((I, Dm), g), _q((I, Dm), g), _q((Dm, I), g))
    for T in (1, 8, 19):
        x = torch.randn(T, Dm, generator=g) * 2
        wts = torch.softmax(torch.randn(T, K, generator=g), -1)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        for dt in (F32, BF16):
            xx = x.to(dt).float()
            out[f"moe/T{T}/{dt}"] = DM.moe(xx, wts, idx, experts, shared, swiglu_limit=10.0, dtype=dt)
    # Qwen3 projection stages (odd dims: padded N, K % 4 != 0)
    Hq, Q, KVd, Iq = 200, 5 * 40, 2 * 40, 333
    shapes = {"q": (Q, Hq), "k": (KVd, Hq), "v": (KVd, Hq), "o": (Hq, Q), "g": (Iq, Hq), "u": (Iq, Hq), "d": (Hq, Iq)}
    ws = {n: _q(s, g) for n, s in shapes.items()}
    nw, pnw = 1 + 0.2 * torch.randn(Hq, generator=g), 1 + 0.2 * torch.randn(Hq, generator=g)
    for T in (1, 6, 17):
        for dt in (F32, BF16):
            def r(*s, dt=dt):
                return torch.randn(*s, generator=g).to(dt).float()

            x, attn, res, act = r(T, Hq) * 3, r(T, Q), r(T, Hq), r(T, Iq)
            q, k, v = QQ.input_norm_qkv(x, nw, ws["q"], ws["k"], ws["v"], 1e-6, dt)
            h, hn = QO.o_proj_residual_norm(attn, ws["o"], res, pnw, 1e-6, dt)
            outs = {"q": q, "k": k, "v": v, "h": h, "hn": hn, "act": QM.gate_up_swiglu(x, ws["g"], ws["u"], dt),
                    "down": QM.down_residual(act, ws["d"], res, dt)}
            for name, val in outs.items():
                out[f"qwen3/T{T}/{dt}/{name}"] = val
    return out


_CHILD = r"""
import sys, torch
sys.path[:0] = sys.argv[1:3]
from llm_kernels.kernels.common import jit
assert jit.TIER == "avx2" and jit.INT8_TILE == "avx2" and jit.dispatch_path() == "avx2", jit.dispatch_info()
assert jit.USE_INT8_TILES and not jit.USE_VNNI and not jit.USE_BF16
import kernel_tiers as KT
assert KT.active_tier() == "avx2", KT.active_tier()
from llm_kernels.kernels.deepseek_v4.w8a8_heads import heads_layout
from llm_kernels.kernels.qwen3 import proj_common as PC
assert heads_layout(64) == "avx2" and heads_layout(40) == "nk" and PC._layout() == "avx2"
from test_common_x86_avx2 import consumer_outputs, gemm_checks
n = gemm_checks()
torch.save(consumer_outputs(), sys.argv[3])
print(f"AVX2-OK {n} gemm cases")
"""


@KT.needs_cpu("avx2", "to run the AVX2 tier")
def test_avx2_tier_process_matches_golden_and_other_tiers(tmp_path):
    """One child process under ``LLM_KERNELS_TIER=avx2`` (its kernel cache: ``.../<hash>/avx2``;
    a cold one compiles every kernel once, ~1-2 min on 2 cores)."""
    env = dict(os.environ, LLM_KERNELS_TIER="avx2")
    env.pop(jit.FORCE_FALLBACK_ENV, None)
    out = tmp_path / "avx2.pt"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), str(HERE.parent), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "AVX2-OK" in r.stdout, r.stdout[-2000:]
    child = torch.load(out)
    here = consumer_outputs()  # this process's tier (VNNI, plain, ...)
    assert child.keys() == here.keys()
    for k, v in here.items():
        assert v.dtype == child[k].dtype and torch.equal(v, child[k]), f"{k}: avx2 vs tier {jit.TIER}"
