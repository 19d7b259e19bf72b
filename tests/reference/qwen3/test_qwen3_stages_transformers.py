"""Each Qwen3 stage — reference AND fused backend — against transformers' own modules
(``Qwen3RMSNorm``, ``Qwen3Attention`` pieces, ``apply_rotary_pos_emb``, ``Qwen3MLP``,
``Qwen3DecoderLayer``), not only against each other.

The seed review (``shared/seeds/003``) found an RMSNorm that multiplied by
``mean(x²) + eps`` instead of its rsqrt, with a golden carrying the same bug, so kernel ==
golden passed. Here the golden itself is compared with transformers on inputs whose RMS is
far from 1 (scale 5: the buggy factor is ~25 instead of ~0.2), and
``test_missing_rsqrt_would_be_caught`` shows the check fails for exactly that bug.

Tolerances: fp32 stage outputs within 8 · eps32 · max|ref| (same ops, at most a different
reduction order); bf16 within 1 bf16 ulp (2^-8 relative) of the transformers value.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3 as hf

from helpers import EPS32, max_abs
from llm_kernels.models import preset
from llm_kernels.reference.qwen3 import common
from llm_kernels.runtime.qwen3.stages import stages

CFG = preset("qwen3-mini")
BACKENDS = ["reference", "fused"]


def _hf_cfg(cfg=CFG):
    import transformers

    c = transformers.Qwen3Config(**cfg.to_hf_dict())
    c._attn_implementation = "eager"
    return c


def _x(*shape, seed, scale=5.0, dtype=torch.float32):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(dtype).float()


def _close(ours, ref, dtype, what):
    ref = ref.float()
    if dtype == torch.float32:
        tol = 8 * EPS32 * ref.abs().max().item()
    else:  # one bf16 ulp of each element (2^-8 relative), floor for tiny values
        tol = None
    if tol is not None:
        assert max_abs(ours, ref) <= tol, f"{what}: {max_abs(ours, ref):.3g} > {tol:.3g}"
    else:
        ulp = (ref.abs() * 2.0 ** -8).clamp_min(1e-30)
        bad = ((ours - ref).abs() > ulp).sum().item()
        assert bad == 0, f"{what}: {bad} elements more than 1 bf16 ulp off (max {max_abs(ours, ref):.3g})"


def _rmsnorm_module(w, dtype):
    m = hf.Qwen3RMSNorm(w.numel(), eps=CFG.rms_norm_eps).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    x = _x(7, CFG.hidden_size, seed=1, dtype=dtype)
    w = (1 + 0.1 * torch.randn(CFG.hidden_size)).to(dtype)
    with torch.no_grad():
        ref = _rmsnorm_module(w, dtype)(x.to(dtype))
    _close(common.rms_norm(x, w, CFG.rms_norm_eps, dtype), ref, dtype, "rms_norm")


def test_missing_rsqrt_would_be_caught():
    """The seed's bug (x · (mean(x²)+eps) instead of x · rsqrt(...)) fails this comparison
    by orders of magnitude; the correct reference passes it."""
    x = _x(4, CFG.hidden_size, seed=2)
    w = torch.ones(CFG.hidden_size)
    with torch.no_grad():
        ref = _rmsnorm_module(w, torch.float32)(x)
    buggy = w * (x * (x.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps))
    assert max_abs(buggy, ref) > 100 * ref.abs().max().item()
    with pytest.raises(AssertionError):
        _close(buggy, ref, torch.float32, "buggy rms_norm")
    _close(common.rms_norm(x, w, CFG.rms_norm_eps, torch.float32), ref, torch.float32, "rms_norm")


def _layer(dtype, seed=0):
    torch.manual_seed(seed)
    layer = hf.Qwen3DecoderLayer(_hf_cfg(), 0)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return layer.to(dtype).eval()


def _w(layer, name):
    return dict(layer.named_parameters())[name].detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_norm_qkv_matches_transformers(backend, dtype):
    layer = _layer(dtype)
    ops = stages(backend)
    x = _x(5, CFG.hidden_size, seed=3, dtype=dtype)
    q, k, v = ops.input_norm_qkv(x, _w(layer, "input_layernorm.weight"), _w(layer, "self_attn.q_proj.weight"),
                                 _w(layer, "self_attn.k_proj.weight"), _w(layer, "self_attn.v_proj.weight"),
                                 CFG.rms_norm_eps, dtype)
    with torch.no_grad():
        xn = layer.input_layernorm(x.to(dtype))
        for ours, proj, what in ((q, layer.self_attn.q_proj, "q"), (k, layer.self_attn.k_proj, "k"),
                                 (v, layer.self_attn.v_proj, "v")):
            _close(ours, proj(xn), dtype, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_transformers(backend, dtype):
    """q/k norm + RoPE (+ cache write for the paged op) vs transformers' q_norm/k_norm and
    ``apply_rotary_pos_emb`` at positions 0..40 and 3000 (large angles)."""
    layer = _layer(dtype, seed=1)
    ops = stages(backend)
    T, nq, nkv, D = 6, CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    q, k, v = (_x(T, n * D, seed=s, scale=2.0, dtype=dtype) for n, s in ((nq, 4), (nkv, 5), (nkv, 6)))
    pos = torch.tensor([0, 1, 17, 40, 3000, 3001])
    cos, sin = common.rope_cos_sin(CFG.rope, D, pos, dtype)
    cache_dt = dtype
    kc = torch.zeros(4, nkv, 8, D, dtype=cache_dt)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([3, 9, 10, 30, 0, 1])
    qo = ops.qk_norm_rope_cache(q, k, v, _w(layer, "self_attn.q_norm.weight"), _w(layer, "self_attn.k_norm.weight"),
                                cos, sin, CFG.rms_norm_eps, dtype, kc, vc, slots)
    rot = hf.Qwen3RotaryEmbedding(_hf_cfg())
    with torch.no_grad():
        hcos, hsin = rot(q.to(dtype), pos[None])
        qh = layer.self_attn.q_norm(q.to(dtype).view(1, T, nq, D)).transpose(1, 2)
        kh = layer.self_attn.k_norm(k.to(dtype).view(1, T, nkv, D)).transpose(1, 2)
        rq, rk = hf.apply_rotary_pos_emb(qh, kh, hcos, hsin)
    _close(qo, rq[0].transpose(0, 1), dtype, f"{backend} q")
    kcached = kc[slots // 8, :, slots % 8, :].float()
    _close(kcached, rk[0].transpose(0, 1), dtype, f"{backend} cached k")
    assert torch.equal(vc[slots // 8, :, slots % 8, :].float(), v.view(T, nkv, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_o_proj_and_mlp_match_transformers(backend, dtype):
    layer = _layer(dtype, seed=2)
    ops = stages(backend)
    T = 3
    attn = _x(T, CFG.q_size, seed=7, scale=1.0, dtype=dtype)
    res = _x(T, CFG.hidden_size, seed=8, scale=1.0, dtype=dtype)
    h, hn = ops.o_proj_residual_norm(attn, _w(layer, "self_attn.o_proj.weight"), res,
                                     _w(layer, "post_attention_layernorm.weight"), CFG.rms_norm_eps, dtype)
    act = ops.gate_up_swiglu(hn, _w(layer, "mlp.gate_proj.weight"), _w(layer, "mlp.up_proj.weight"), dtype)
    out = ops.down_residual(act, _w(layer, "mlp.down_proj.weight"), h, dtype)
    with torch.no_grad():
        rh = res.to(dtype) + layer.self_attn.o_proj(attn.to(dtype))
        rhn = layer.post_attention_layernorm(rh)
        rout = rh + layer.mlp(rhn)
    _close(h, rh, dtype, f"{backend} h")
    _close(hn, rhn, dtype, f"{backend} post-attention norm")
    # the MLP output adds two GEMMs' roundings on top: compare the residual stream at 2 ulps
    if dtype == torch.float32:
        _close(out, rout, dtype, f"{backend} mlp out")
    else:
        assert ((out - rout.float()).abs() <= rout.float().abs() * 2.0 ** -7 + 1e-6).all(), f"{backend} mlp out"
