"""Golden cases for Qwen3: every fused stage vs its torch reference, and the fused paged
runtime vs the stateless reference, on a seeded random ``qwen3-mini`` checkpoint.

Run with ``python -m llm_kernels golden -k qwen3 [--save-data DIR] [--golden-data DIR]``
(``golden`` runs the DeepSeek-V4 cases and these). Stage shapes use Qwen3-32B's head
geometry (64 query heads, 8 K/V heads, head_dim 128) with a small hidden size; a second
set uses odd dims (head_dim 40, hidden 200) that are not multiples of any tile.

Tolerances: W8A8 projections are bitwise (same INT8 inputs, exact INT32 sums, the same
fp32 dequant); q/k norm + RoPE is bitwise (elementwise, the statistic in torch's order);
paged attention computes in fp32 and rounds once, so vs the fp32 reference on the same
bf16 inputs it is within one bf16 ulp (rtol 2^-8) plus fp32 noise (atol 1e-5); the
runtime: fp32 logits within 1e-4 (~170 ulps at scale 5), W8A8 cosine >= 0.999.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...harness.compare import AllClose, CosineAtLeast
from ...harness.runner import GoldenCase
from ...harness.spec import Normal, RandInt, TensorSpec

__all__ = ["build_cases", "default_qwen3_checkpoint"]

_EXACT = AllClose(rtol=0.0, atol=0.0)
_BF16_ONCE = AllClose(rtol=2.0 ** -8, atol=1e-5)


def default_qwen3_checkpoint() -> Path:
    """``qwen3-mini`` (seed 0, float32) in the llm_kernels cache dir, written on first use."""
    from ...checkpoint.defaults import default_checkpoint

    return default_checkpoint("qwen3-mini", seed=0, dtype=torch.float32, progress=False)


def _ops(backend: str):
    from ...runtime.qwen3.stages import stages

    return stages(backend)


def _stage_cases(tag: str, hidden: int, nq: int, nkv: int, D: int, inter: int, T: int) -> list[GoldenCase]:
    from ...numerics.quant import quantize_weight
    from ...numerics.rope import RopeParameters
    from ...reference.qwen3.common import rope_cos_sin

    bf = torch.bfloat16
    cases = []

    def wq(v, name):  # W8A8 weight from a float spec
        return quantize_weight(v[name])

    def qkv(backend):
        def f(v):
            q, k, vv = _ops(backend).input_norm_qkv(v["x"].to(bf).float(), v["norm_w"], wq(v, "wq"), wq(v, "wk"),
                                                    wq(v, "wv"), 1e-6, bf)
            return {"q": q, "k": k, "v": vv}
        return f

    cases.append(GoldenCase(
        f"qwen3/input_norm_qkv_w8a8/{tag}",
        [TensorSpec("x", (T, hidden), torch.float32, Normal(3.0, seed=1)),
         TensorSpec("norm_w", (hidden,), torch.float32, Normal(0.1, 1.0, seed=2)),
         TensorSpec("wq", (nq * D, hidden), torch.float32, Normal(hidden ** -0.5, seed=3)),
         TensorSpec("wk", (nkv * D, hidden), torch.float32, Normal(hidden ** -0.5, seed=4)),
         TensorSpec("wv", (nkv * D, hidden), torch.float32, Normal(hidden ** -0.5, seed=5)),
         TensorSpec("q", (T, nq * D), torch.float32, is_output=True),
         TensorSpec("k", (T, nkv * D), torch.float32, is_output=True),
         TensorSpec("v", (T, nkv * D), torch.float32, is_output=True)],
        golden=qkv("reference"), impl=qkv("fused"), comparators={"q": _EXACT, "k": _EXACT, "v": _EXACT}))

    def mlp(backend):
        def f(v):
            ops = _ops(backend)
            h, hn = ops.o_proj_residual_norm(v["attn"].to(bf).float(), wq(v, "wo"), v["res"].to(bf).float(),
                                             v["post_w"], 1e-6, bf)
            act = ops.gate_up_swiglu(hn, wq(v, "wg"), wq(v, "wu"), bf)
            return {"h": h, "hn": hn, "out": ops.down_residual(act, wq(v, "wd"), h, bf)}
        return f

    cases.append(GoldenCase(
        f"qwen3/o_proj_mlp_w8a8/{tag}",
        [TensorSpec("attn", (T, nq * D), torch.float32, Normal(1.0, seed=6)),
         TensorSpec("res", (T, hidden), torch.float32, Normal(1.0, seed=7)),
         TensorSpec("post_w", (hidden,), torch.float32, Normal(0.1, 1.0, seed=8)),
         TensorSpec("wo", (hidden, nq * D), torch.float32, Normal((nq * D) ** -0.5, seed=9)),
         TensorSpec("wg", (inter, hidden), torch.float32, Normal(hidden ** -0.5, seed=10)),
         TensorSpec("wu", (inter, hidden), torch.float32, Normal(hidden ** -0.5, seed=11)),
         TensorSpec("wd", (hidden, inter), torch.float32, Normal(inter ** -0.5, seed=12)),
         TensorSpec("h", (T, hidden), torch.float32, is_output=True),
         TensorSpec("hn", (T, hidden), torch.float32, is_output=True),
         TensorSpec("out", (T, hidden), torch.float32, is_output=True)],
        golden=mlp("reference"), impl=mlp("fused"), comparators={"h": _EXACT, "hn": _EXACT, "out": _EXACT}))

    bs, ctx = 16, 300
    nblk = -(-ctx // bs) + 1

    def attn(backend, dtype):
        def f(v):
            ops = _ops(backend)
            pos = torch.arange(ctx - T, ctx)
            cos, sin = rope_cos_sin(RopeParameters("default", 1e6), D, pos, bf)
            kc = v["k_cache"].to(bf)
            vc = v["v_cache"].to(bf)
            slots = pos + bs  # the sequence's pages are 1, 2, ... (page 0 unused)
            q = ops.qk_norm_rope_cache(v["q"].to(bf).float(), v["k"].to(bf).float(), v["v"].to(bf).float(),
                                       v["qn"], v["kn"], cos, sin, 1e-6, bf, kc, vc, slots)
            table = torch.arange(1, nblk, dtype=torch.int32)[None]
            o = ops.paged_attention(q, kc, vc, table, torch.zeros(T, dtype=torch.int32),
                                    (pos + 1).to(torch.int32), D ** -0.5, dtype)
            return {"q_rot": q, "k_cache": kc.float(), "out": o}
        return f

    specs = [TensorSpec("q", (T, nq * D), torch.float32, Normal(2.0, seed=13)),
             TensorSpec("k", (T, nkv * D), torch.float32, Normal(2.0, seed=14)),
             TensorSpec("v", (T, nkv * D), torch.float32, Normal(1.0, seed=15)),
             TensorSpec("qn", (D,), torch.float32, Normal(0.1, 1.0, seed=16)),
             TensorSpec("kn", (D,), torch.float32, Normal(0.1, 1.0, seed=17)),
             TensorSpec("k_cache", (nblk, nkv, bs, D), torch.float32, Normal(1.0, seed=18)),
             TensorSpec("v_cache", (nblk, nkv, bs, D), torch.float32, Normal(1.0, seed=19)),
             TensorSpec("q_rot", (T, nq, D), torch.float32, is_output=True),
             TensorSpec("out", (T, nq * D), torch.float32, is_output=True)]
    cases.append(GoldenCase(
        f"qwen3/qk_norm_rope_paged_attention_bf16/{tag}", specs,
        golden=attn("reference", torch.float32), impl=attn("fused", torch.bfloat16),
        comparators={"q_rot": _EXACT, "k_cache": _EXACT, "out": _BF16_ONCE}))
    return cases


def build_cases(checkpoint: Path | None = None) -> list[GoldenCase]:
    """Stage cases (32B head geometry and odd dims) and the runtime case over
    ``checkpoint`` (default :func:`default_qwen3_checkpoint`)."""
    cases = _stage_cases("32b_heads", hidden=256, nq=64, nkv=8, D=128, inter=512, T=4)
    cases += _stage_cases("odd", hidden=200, nq=5, nkv=1, D=40, inter=333, T=3)

    def load(dtype, quant=None):
        from ...checkpoint import load_checkpoint

        return load_checkpoint(checkpoint or default_qwen3_checkpoint(), dtype=dtype, progress=False, quant=quant)

    for dtype, quant, cmp in ((torch.float32, None, AllClose(rtol=0.0, atol=1e-4)),
                              (torch.bfloat16, "w8a8", CosineAtLeast(0.999))):
        prompt, steps = 24, 40

        def golden(v, dtype=dtype, quant=quant):
            from ...reference.qwen3.model import forward

            cfg, w = load(dtype, quant)
            return {"logits": forward(w, cfg, v["ids"], dtype)[prompt - 1:]}

        def impl(v, dtype=dtype, quant=quant):
            from ...runtime.qwen3.engine import Qwen3Engine

            cfg, w = load(dtype, quant)
            eng = Qwen3Engine(w, cfg, dtype, max_seq_len=prompt + steps, block_size=16, ops=_ops("fused"))
            ids = v["ids"].tolist()
            (s,), (lg,) = eng.prefill([ids[:prompt]])
            rows = [lg[-1:]] + [eng.decode([s], [t])[0] for t in ids[prompt:]]
            return {"logits": torch.cat(rows)}

        name = f"qwen3/runtime_fused_decode/{'w8a8' if quant else 'fp32'}"
        cases.append(GoldenCase(
            name, [TensorSpec("ids", (prompt + steps,), torch.int64, RandInt(0, 512, seed=5)),
                   TensorSpec("logits", (steps + 1, 512), torch.float32, is_output=True)],
            golden=golden, impl=impl, comparators={"logits": cmp}))
    return cases


def main(argv: list[str] | None = None) -> int:
    from ...harness.runner import main as run_main

    ckpt = os.environ.get("LLM_KERNELS_GOLDEN_QWEN3_CHECKPOINT")
    return run_main(build_cases(Path(ckpt) if ckpt else None), argv)
