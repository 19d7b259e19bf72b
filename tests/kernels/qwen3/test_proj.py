"""Fused Qwen3 projection stages (``kernels/qwen3/{qkv_proj,o_proj,mlp}.py``) vs the torch
reference (``reference/qwen3``): fp32 / bf16 / W8A8, small and odd dims, T in {1, 3, 17}.

Expected agreement (the contracts stated in ``kernels/qwen3/proj_common.py``):

* W8A8 weights (both kernel families, VNNI and plain): bitwise equal.
* float weights, float32 mode, and bf16 mode on the torch-GEMM path (T > BF16_GEMV_MAX_T or
  no AVX512_BF16): bitwise equal.
* bf16 mode, bf16 weights, T <= BF16_GEMV_MAX_T (the Numba ``vdpbf16ps`` GEMV): the GEMM
  sums exact bf16 products in another fp32 order than oneDNN, so a projection output may
  round to the neighbouring bf16 value: <= 1 bf16 ulp; outputs derived from a projection
  through one more rounded op (SwiGLU, the norm of h) <= 2 ulps. Tested as
  ``|a - e| <= ulps · ulp_bf16(e) + 1e-6``, and at least 98 % of the elements bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import kernel_tiers as KT
import pytest
import torch

from llm_kernels.kernels.common import jit
from llm_kernels.kernels.qwen3 import mlp as KM
from llm_kernels.kernels.qwen3 import o_proj as KO
from llm_kernels.kernels.qwen3 import proj_common as PC
from llm_kernels.kernels.qwen3 import qkv_proj as KQ
from llm_kernels.numerics.quant import QuantWeight, quantize_weight
from llm_kernels.reference.qwen3 import mlp as RM
from llm_kernels.reference.qwen3 import o_proj as RO
from llm_kernels.reference.qwen3 import qkv_proj as RQ

F32, BF16 = torch.float32, torch.bfloat16
EPS = 1e-6
# hidden, q = nq*D, kv = nkv*D, intermediate
DIMS = {"small": (256, 4 * 64, 2 * 64, 512), "odd": (200, 5 * 40, 2 * 40, 333)}
#: The process's register-tile layout ("vnni", or "avx2" under LLM_KERNELS_TIER=avx2 / on an AVX2-only CPU).
LAYOUTS = [pytest.param(jit.INT8_TILE or "vnni", marks=pytest.mark.skipif(jit.INT8_TILE is None,
                                                                       reason=KT.need_reason("avx2"))), "nk"]

_WEIGHTS: dict = {}


def _weights(dims: str, wmode: str) -> dict:
    """Layer weights (cached per dims/mode): float32 for "f32", bf16 for "bf16", QuantWeight
    for "w8a8", and the norm gains."""
    key = (dims, wmode)
    if key not in _WEIGHTS:
        H, Q, KV, I = DIMS[dims]
        g = torch.Generator().manual_seed(sum(DIMS[dims]))
        shapes = {"q": (Q, H), "k": (KV, H), "v": (KV, H), "o": (H, Q), "g": (I, H), "u": (I, H), "d": (H, I)}
        ws = {n: torch.randn(*s, generator=g) * 0.05 for n, s in shapes.items()}
        if wmode == "bf16":
            ws = {n: w.to(BF16) for n, w in ws.items()}
        elif wmode == "w8a8":
            ws = {n: quantize_weight(w) for n, w in ws.items()}
        ndt = BF16 if wmode == "bf16" else F32
        ws["nw"] = (1 + 0.2 * torch.randn(H, generator=g)).to(ndt)
        ws["pnw"] = (1 + 0.2 * torch.randn(H, generator=g)).to(ndt)
        _WEIGHTS[key] = ws
    return _WEIGHTS[key]


def _inputs(dims: str, T: int, dtype: torch.dtype, seed: int = 0) -> dict:
    H, Q, _, I = DIMS[dims]
    g = torch.Generator().manual_seed(1000 * T + seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype).float()

    return {"x": r(T, H) * 3, "attn": r(T, Q), "res": r(T, H), "act": r(T, I)}


def _run_all(mod_q, mod_o, mod_m, w: dict, v: dict, dtype: torch.dtype) -> dict:
    q, k, vv = mod_q.input_norm_qkv(v["x"], w["nw"], w["q"], w["k"], w["v"], EPS, dtype)
    h, hn = mod_o.o_proj_residual_norm(v["attn"], w["o"], v["res"], w["pnw"], EPS, dtype)
    a = mod_m.gate_up_swiglu(v["x"], w["g"], w["u"], dtype)
    d = mod_m.down_residual(v["act"], w["d"], v["res"], dtype)
    return {"q": q, "k": k, "v": vv, "h": h, "hn": hn, "act": a, "down": d}


def _reference(w, v, dtype):
    return _run_all(RQ, RO, RM, w, v, dtype)


def _fused(w, v, dtype):
    return _run_all(KQ, KO, KM, w, v, dtype)


def _ulp_bf16(e: torch.Tensor) -> torch.Tensor:
    """Spacing of the bf16 grid at |e| (e holds bf16 values): 2^(exponent - 7)."""
    m = e.abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(m)) - 7)


def _assert_equal(got: dict, ref: dict, what: str) -> None:
    for name, e in ref.items():
        a = got[name]
        assert a.shape == e.shape and a.dtype == torch.float32, (what, name, a.shape, e.shape)
        bad = (a != e).sum().item()
        assert bad == 0, f"{what}/{name}: {bad} of {e.numel()} elements differ, max |d| {(a - e).abs().max().item():.3g}"


_ULPS = {"q": 1, "k": 1, "v": 1, "h": 1, "down": 1, "hn": 2, "act": 2}


def _assert_bf16_close(got: dict, ref: dict, what: str) -> None:
    for name, e in ref.items():
        a = got[name]
        assert a.shape == e.shape, (what, name)
        assert torch.equal(a, a.to(BF16).float()), f"{what}/{name}: output not bf16-valued"
        tol = _ULPS[name] * _ulp_bf16(e) + 1e-6
        d = (a - e).abs()
        assert bool((d <= tol).all()), f"{what}/{name}: max excess {(d - tol).max().item():.3g}"
        assert (a == e).float().mean().item() >= 0.98, f"{what}/{name}: < 98 % bitwise"


# --------------------------------------------------------------------------- golden tests
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dims", list(DIMS))
def test_w8a8_bitwise(dims, dtype, layout, monkeypatch):
    monkeypatch.setattr(PC, "FORCE_LAYOUT", layout)
    w = _weights(dims, "w8a8")
    for T in (1, 3, 17):
        v = _inputs(dims, T, dtype)
        _assert_equal(_fused(w, v, dtype), _reference(w, v, dtype), f"w8a8/{layout}/{dims}/T{T}")


@pytest.mark.parametrize("dims", list(DIMS))
def test_float32_bitwise(dims):
    w = _weights(dims, "f32")
    for T in (1, 3, 17):
        v = _inputs(dims, T, F32)
        _assert_equal(_fused(w, v, F32), _reference(w, v, F32), f"f32/{dims}/T{T}")


@pytest.mark.parametrize("dims", list(DIMS))
def test_bf16(dims):
    w = _weights(dims, "bf16")
    for T in (1, 3, 17):
        v = _inputs(dims, T, BF16)
        got, ref = _fused(w, v, BF16), _reference(w, v, BF16)
        if T <= PC.BF16_GEMV_MAX_T and PC.USE_BF16_GEMV:
            _assert_bf16_close(got, ref, f"bf16-gemv/{dims}/T{T}")
        else:
            _assert_equal(got, ref, f"bf16-torch/{dims}/T{T}")


def test_bf16_gemv_bound_at_long_k():
    """K = 5120 (Qwen3-32B hidden): the GEMV's summation order really differs from oneDNN's."""
    if not PC.USE_BF16_GEMV:
        pytest.skip(KT.need_reason("avx512-vnni-bf16", "active, not forced off (the vdpbf16ps GEMV)"))
    g = torch.Generator().manual_seed(7)
    wq, wk, wv = (torch.randn(n, 5120, generator=g).to(BF16) * 0.02 for n in (192, 64, 64))
    nw = (1 + 0.1 * torch.randn(5120, generator=g)).to(BF16)
    for T in (1, 4):
        x = torch.randn(T, 5120, generator=g).to(BF16).float()
        got = dict(zip("qkv", KQ.input_norm_qkv(x, nw, wq, wk, wv, EPS, BF16)))
        ref = dict(zip("qkv", RQ.input_norm_qkv(x, nw, wq, wk, wv, EPS, BF16)))
        _assert_bf16_close(got, ref, f"bf16 K=5120 T{T}")


def test_mixed_weights_and_leading_dims():
    """wq W8A8 with float wk/wv (each projection on its own), and x [2, 3, hidden]."""
    wf, w8 = _weights("odd", "f32"), _weights("odd", "w8a8")
    x = _inputs("odd", 6, F32)["x"].reshape(2, 3, -1)
    got = KQ.input_norm_qkv(x, wf["nw"], w8["q"], wf["k"], wf["v"], EPS, F32)
    ref = RQ.input_norm_qkv(x, wf["nw"], w8["q"], wf["k"], wf["v"], EPS, F32)
    for a, e in zip(got, ref):
        assert a.shape == e.shape and torch.equal(a, e)


def test_deterministic_across_threads():
    w = _weights("small", "w8a8")
    v = _inputs("small", 17, BF16)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _fused(w, v, BF16)
    finally:
        numba.set_num_threads(n)
    _assert_equal(_fused(w, v, BF16), one, "threads")


def test_silu_tails_match_torch_threading():
    """The SwiGLU epilogue uses libm ``expf`` exactly where torch's silu runs its scalar
    tail; a product long enough for torch to split it over threads (T*I > 32768)."""
    g = torch.Generator().manual_seed(3)
    I, H = 4001, 64
    wg, wu = (quantize_weight(torch.randn(I, H, generator=g)) for _ in range(2))
    x = torch.randn(9, H, generator=g) * 4
    for dtype in (F32, BF16):
        assert torch.equal(KM.gate_up_swiglu(x, wg, wu, dtype), RM.gate_up_swiglu(x, wg, wu, dtype))


# --------------------------------------------------------------------------- prepared weights
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepared_weights_bitwise_and_shared_per_stage(layout, monkeypatch):
    """``prepare_weights`` packs each stage's W8A8 weights once into one shared
    :class:`PC.ProjW8A8`; the stages run on it bitwise like on unprepared weights, and a
    prepared weight keeps its QuantWeight identity (shape, scale, qweight rebuilt)."""
    from llm_kernels.kernels.common.prepared import PackedRows
    from llm_kernels.kernels.qwen3.prepare import prepare_weights

    monkeypatch.setattr(PC, "FORCE_LAYOUT", layout)
    w = _weights("odd", "w8a8")
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "g": "mlp.gate_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"}
    raw = {f"model.layers.0.{n}.weight": w[k] for k, n in names.items()}
    prep = prepare_weights(raw, None)
    pw = {k: prep[f"model.layers.0.{n}.weight"] for k, n in names.items()}
    assert all(isinstance(x, PackedRows) and isinstance(x, QuantWeight) for x in pw.values())
    assert pw["q"].group is pw["k"].group is pw["v"].group and pw["g"].group is pw["u"].group
    assert pw["q"].group.pk.layout == layout
    assert prepare_weights(prep, None)["model.layers.0.mlp.up_proj.weight"] is pw["u"]  # idempotent
    for k in names:
        assert pw[k].shape == w[k].shape and torch.equal(pw[k].scale, w[k].scale)
        assert torch.equal(pw[k].qweight, w[k].qweight), k
    pw.update(nw=w["nw"], pnw=w["pnw"])
    for dtype in (F32, BF16):
        for T in (1, 17):
            v = _inputs("odd", T, dtype)
            _assert_equal(_fused(pw, v, dtype), _fused(w, v, dtype), f"prepared/{layout}/T{T}")


def test_stage_falls_back_to_packing_for_unmatched_weights():
    """A new weight object next to prepared ones (not one prepared group) is packed for the
    call: results follow the weights actually passed."""
    from llm_kernels.kernels.qwen3.prepare import prepare_weights

    w = _weights("odd", "w8a8")
    prep = prepare_weights({f"model.layers.0.self_attn.{n}_proj.weight": w[n] for n in "qkv"}, None)
    pk, pv = (prep[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "kv")
    x = _inputs("odd", 3, F32)["x"]
    wq2 = QuantWeight(w["q"].qweight.flip(0).contiguous(), w["q"].scale.flip(0).contiguous())
    q2, k2, _ = KQ.input_norm_qkv(x, w["nw"], wq2, pk, pv, EPS, F32)
    rq2, rk2, _ = RQ.input_norm_qkv(x, w["nw"], wq2, w["k"], w["v"], EPS, F32)
    assert torch.equal(q2, rq2) and torch.equal(k2, rk2)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_tensor():
    w = _weights("odd", "w8a8")
    wf = _weights("odd", "f32")
    v = _inputs("odd", 2, F32)
    x, attn, res, act = v["x"], v["attn"], v["res"], v["act"]
    with pytest.raises(ValueError, match="x"):
        KQ.input_norm_qkv(x[:, :-1], w["nw"], w["q"], w["k"], w["v"], EPS, F32)
    with pytest.raises(ValueError, match="norm_w"):
        KQ.input_norm_qkv(x, w["nw"][:-1], w["q"], w["k"], w["v"], EPS, F32)
    with pytest.raises(ValueError, match="wk"):
        KQ.input_norm_qkv(x, w["nw"], w["q"], wf["d"], w["v"], EPS, F32)
    with pytest.raises(TypeError, match="wv"):
        KQ.input_norm_qkv(x, w["nw"], w["q"], w["k"], "nope", EPS, F32)
    with pytest.raises(TypeError, match="x"):
        KQ.input_norm_qkv(x.to(torch.int32), w["nw"], w["q"], w["k"], w["v"], EPS, F32)
    with pytest.raises(ValueError, match="dtype"):
        KQ.input_norm_qkv(x, w["nw"], w["q"], w["k"], w["v"], EPS, torch.float16)
    with pytest.raises(ValueError, match="attn"):
        KO.o_proj_residual_norm(act, w["o"], res, w["pnw"], EPS, F32)
    with pytest.raises(ValueError, match="residual"):
        KO.o_proj_residual_norm(attn, w["o"], res[:, :-1], w["pnw"], EPS, F32)
    with pytest.raises(ValueError, match="residual"):
        KO.o_proj_residual_norm(attn, w["o"], res[:1], w["pnw"], EPS, F32)
    with pytest.raises(ValueError, match="post_norm_w"):
        KO.o_proj_residual_norm(attn, w["o"], res, w["pnw"][:-1], EPS, F32)
    with pytest.raises(ValueError, match="w_up"):
        KM.gate_up_swiglu(x, w["g"], w["d"], F32)
    with pytest.raises(TypeError, match="w_gate, w_up"):
        KM.gate_up_swiglu(x, w["g"], wf["u"], F32)
    with pytest.raises(ValueError, match="x"):
        KM.gate_up_swiglu(act, w["g"], w["u"], F32)
    with pytest.raises(ValueError, match="act"):
        KM.down_residual(x, w["d"], res, F32)
    with pytest.raises(ValueError, match="residual"):
        KM.down_residual(act, w["d"], res.T.contiguous(), F32)
    with pytest.raises(TypeError, match="residual"):
        KM.down_residual(act, w["d"], res.numpy(), F32)
    with pytest.raises(ValueError, match="dtype"):
        KM.down_residual(act, w["d"], res, "bf16")


# --------------------------------------------------------------------------- fallback process
# The forced fallback (LLM_KERNELS_FORCE_FALLBACK=1, read at import: a fresh process) on the same
# weights and inputs as this process's fast path. W8A8: the plain "nk" kernels and the VNNI
# kernels both compute the exact INT32 dot product and the same fp32 dequant -> bitwise. bf16
# weights in bf16 mode at T <= BF16_GEMV_MAX_T: the fallback runs the torch GEMM (bitwise the
# reference), the fast path the vdpbf16ps GEMV -> the GEMV's contract (module docstring: <= 1-2
# bf16 ulps, >= 98 % bitwise); above BF16_GEMV_MAX_T both run torch -> bitwise.
_CHILD = r"""
import json, sys, torch
sys.path[:0] = sys.argv[1:3]
from test_proj import _weights, _inputs, _fused, _CASES
from llm_kernels.kernels.common import jit
from llm_kernels.kernels.qwen3 import proj_common as PC
assert jit.FORCE_FALLBACK and not jit.USE_VNNI and not PC.USE_BF16_GEMV, jit.dispatch_info()
assert PC.pack_stage((_weights("odd", "w8a8")["q"],), PC.MODE_SPLIT).pk.layout == "nk"
out = {}
for wmode, dtype, T in _CASES:
    got = _fused(_weights("odd", wmode), _inputs("odd", T, dtype), dtype)
    for k, t in got.items():
        out[f"{wmode}/{dtype}/{T}/{k}"] = t.view(torch.int32).flatten().tolist()
print(json.dumps(out))
"""
_CASES = [("w8a8", F32, 1), ("w8a8", F32, 17), ("w8a8", BF16, 1), ("w8a8", BF16, 17),
          ("bf16", BF16, 1), ("bf16", BF16, 3), ("bf16", BF16, 17)]


@pytest.mark.skipif(jit.INT8_TILE is None, reason=KT.need_reason("avx2", "for a fast path to compare the forced "
                                                                 "fallback with (without it the fallback is the only path)"))
def test_forced_fallback_subprocess_matches_fast_path(monkeypatch):
    """Fallback process vs this process's fast path (forced on here, so that the comparison
    holds even when pytest itself runs with LLM_KERNELS_FORCE_FALLBACK=1)."""
    monkeypatch.setattr(PC, "FORCE_LAYOUT", jit.INT8_TILE)
    monkeypatch.setattr(PC, "USE_BF16_GEMV", jit.HAS_AVX512BF16)
    assert PC.pack_stage((_weights("odd", "w8a8")["q"],), PC.MODE_SPLIT).pk.layout == jit.INT8_TILE
    env = dict(os.environ, LLM_KERNELS_FORCE_FALLBACK="1")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _CHILD, here, os.path.dirname(here)], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    child = json.loads(r.stdout.strip().splitlines()[-1])
    for wmode, dtype, T in _CASES:
        fast = _fused(_weights("odd", wmode), _inputs("odd", T, dtype), dtype)
        plain = {k: torch.tensor(child[f"{wmode}/{dtype}/{T}/{k}"], dtype=torch.int32).view(torch.float32).view(t.shape)
                 for k, t in fast.items()}
        what = f"fallback vs fast {wmode}/{dtype}/T{T}"
        if wmode == "bf16" and T <= PC.BF16_GEMV_MAX_T and PC.USE_BF16_GEMV:
            _assert_bf16_close(fast, plain, what)
        else:
            _assert_equal(plain, fast, what)


@pytest.mark.parametrize("int8_head", [False, True], ids=["bf16_head", "int8_head"])
@pytest.mark.parametrize("T", [1, 5])
def test_logits_head_matches_reference(int8_head, T):
    """Fused ``logits_head`` (final RMSNorm + head) vs the reference: bitwise for a float
    head (the same torch ops) and for an INT8 head (exact INT32 GEMM, golden dequant)."""
    from types import SimpleNamespace

    from llm_kernels.kernels.common.linear import prepare_linear
    from llm_kernels.kernels.qwen3.head import logits_head
    from llm_kernels.numerics.quant import quantize_weight
    from llm_kernels.reference.qwen3.model import logits_head as ref_logits_head

    g = torch.Generator().manual_seed(T)
    D, V = 96, 300
    cfg = SimpleNamespace(rms_norm_eps=1e-6, tie_word_embeddings=False)
    head = (torch.randn(V, D, generator=g) / D ** 0.5).to(torch.bfloat16)
    w = {"model.norm.weight": (1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16),
         "lm_head.weight": quantize_weight(head) if int8_head else head}
    x = torch.randn(T, D, generator=g).to(torch.bfloat16).float()
    ref = ref_logits_head(w, cfg, x, torch.bfloat16)
    fused_w = dict(w, **({"lm_head.weight": prepare_linear(w["lm_head.weight"])} if int8_head else {}))
    assert torch.equal(logits_head(fused_w, cfg, x, torch.bfloat16), ref)
