"""Accuracy of INT8 weight classes against the bf16 model (DeepSeek-V4 or Qwen3), teacher-forced.

For a float checkpoint, runs the reference engine (bf16 activations) over ``--tokens``
seeded random ids (one prefill, logits of every row) once with the float weights and once
per variant, and reports against the float run, per variant:

* ``KL``: mean over positions of ``KL(p_bf16 || p_variant)`` (natural log; what
  llama.cpp's ``llama-perplexity --kl-divergence`` reports), and its 99th percentile;
* ``cos``: mean cosine of the logit rows;
* ``top1``: % of positions whose argmax agrees (llama.cpp's "Same top p");
* ``GB/tok``: bytes of the 2-D weights read per decoded token at the variant's precision
  (routed experts counted at top-k of n; embedding excluded, it is a row gather).

Variants:

* ``w8a8``: the spec's W8A8 set (per-output-channel INT8 weights, per-token INT8
  activations: :mod:`llm_kernels.numerics.quant`), everything else bf16;
* ``w8a8+<class>``: plus one more weight class in the same format (the per-class cost);
* ``int8``: every class below (the ``int8`` scheme);
* ``q8_0``: an emulation of llama.cpp's Q8_0 on the same 2-D weights as ``int8`` (blocks
  of 32 inputs, scales rounded to fp16, activations quantised to Q8_0 blocks too):
  dequantised exactly and multiplied in fp32, so it differs from llama.cpp's integer dot
  only by fp32 summation order;
* ``g<G>``: the ``int8`` weights with scales per G inputs (weights and activations,
  fp32 scales) -- what a finer-grained INT8 format would buy;
* ``int8_g32``: the ``int8_g32`` scheme itself (:mod:`llm_kernels.numerics.group_quant`:
  bf16 weight scales rounded up, per-32 activation scales, exact INT32 block sums), run
  through the reference's own ``group_linear`` golden (no emulation).

Run::

    python benchmarks/int8_accuracy.py --checkpoint /tmp/flash3 --tokens 256 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time

import torch
import torch.nn.functional as F

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.numerics.group_quant import GroupQuantWeight, quantize_weight_grouped
from llm_kernels.numerics.quant import QuantWeight, quantize_weight
from llm_kernels.numerics.rounding import rnd

CLASSES = {
    "lm_head": r"^(lm_)?head\.weight$",
    "wq_a+wkv": r"^layers\.\d+\.attn\.(wq_a|wkv)\.weight$",
    "wo_a": r"^layers\.\d+\.attn\.wo_a\.weight$",
    "compressor": r"^layers\.\d+\.attn\.(indexer\.)?compressor\.(wkv|wgate)\.weight$",
    "indexer.weights_proj": r"^layers\.\d+\.attn\.indexer\.weights_proj\.weight$",
}


class FakeQuant:
    """A weight quantised in blocks of ``g`` inputs (int8 + one scale per block), used by
    the patched ``linear``: both operands are dequantised exactly and multiplied in fp32."""

    def __init__(self, w: torch.Tensor, g: int, fp16_scales: bool):
        self.g, self.fp16 = g, fp16_scales
        self.q, self.d = block_quant(w.float(), g, fp16_scales)
        self.shape = w.shape

    def deq_rows(self, r0: int, r1: int) -> torch.Tensor:
        q, d = self.q[r0:r1], self.d[r0:r1]
        n, k = q.shape
        return (q.float().view(n, -1, self.g) * d.unsqueeze(-1)).view(n, k)


def block_quant(x: torch.Tensor, g: int, fp16_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0-style: per block of ``g`` along the last dim, ``d = amax/127``,
    ``q = round(x/d)`` (half away from zero like C's roundf), scale stored as fp16 if asked."""
    *lead, k = x.shape
    if k % g:
        raise ValueError(f"K={k} is not a multiple of the block {g}")
    xb = x.reshape(*lead, k // g, g)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = xb * inv.unsqueeze(-1)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
    if fp16_scales:
        d = d.half().float()
    return q.reshape(*lead, k), d


def fake_act(x: torch.Tensor, g: int, fp16_scales: bool) -> torch.Tensor:
    q, d = block_quant(x.float(), g, fp16_scales)
    *lead, k = q.shape
    return (q.float().reshape(*lead, k // g, g) * d.unsqueeze(-1)).reshape(*lead, k)


def fq_linear(x: torch.Tensor, w: FakeQuant, dtype: torch.dtype) -> torch.Tensor:
    xa = fake_act(x, w.g, w.fp16)
    outs = [F.linear(xa, w.deq_rows(r, min(r + 16384, w.shape[0]))) for r in range(0, w.shape[0], 16384)]
    return rnd(torch.cat(outs, dim=-1), dtype)


@contextlib.contextmanager
def patched_reference():
    """Route ``linear``/``grouped_output_proj`` of :class:`FakeQuant` weights through the
    emulation in every reference module and the reference ops table."""
    from llm_kernels.reference.deepseek_v4 import sparse_attn as ref_attn
    from llm_kernels.reference.qwen3 import mlp, model, o_proj, qkv_proj  # noqa: F401  (patched below)
    from llm_kernels.runtime.deepseek_v4 import stages

    orig_linear = stages.REFERENCE_OPS.linear
    orig_gop = stages.REFERENCE_OPS.grouped_output_proj

    def linear(x, w, dtype):
        return fq_linear(x, w, dtype) if isinstance(w, FakeQuant) else orig_linear(x, w, dtype)

    def grouped_output_proj(o, wo_a, wo_b, *, o_groups, dtype):
        if not isinstance(wo_a, FakeQuant) and not isinstance(wo_b, FakeQuant):
            return orig_gop(o, wo_a, wo_b, o_groups=o_groups, dtype=dtype)
        T = o.shape[0]
        og = o.float().reshape(T, o_groups, -1)
        ol = wo_a.shape[0] // o_groups
        if isinstance(wo_a, FakeQuant):
            xa = fake_act(og, wo_a.g, wo_a.fp16)
            r = torch.stack([rnd(F.linear(xa[:, g], wo_a.deq_rows(g * ol, (g + 1) * ol)), dtype)
                             for g in range(o_groups)], dim=1)
        else:
            wa = wo_a.float().view(o_groups, -1, og.shape[-1])
            r = rnd(torch.einsum("tgk,gok->tgo", og, wa), dtype)
        r = r.reshape(T, -1)
        return linear(r, wo_b, dtype)

    mods = [m for n, m in list(sys.modules.items()) if n.startswith("llm_kernels.reference.")]
    saved = [(m, m.linear) for m in mods if getattr(m, "linear", None) is orig_linear]
    for m, _ in saved:
        m.linear = linear
    stages.REFERENCE_OPS.linear = linear
    stages.REFERENCE_OPS.grouped_output_proj = grouped_output_proj
    try:
        yield
    finally:
        for m, f in saved:
            m.linear = f
        stages.REFERENCE_OPS.linear = orig_linear
        stages.REFERENCE_OPS.grouped_output_proj = orig_gop
        assert ref_attn.grouped_output_proj is orig_gop


def weight_bytes(weights: dict, cfg) -> float:
    """GB of 2-D weights read per decoded token (routed experts at top-k of n)."""
    frac = getattr(cfg, "num_experts_per_tok", 1) / getattr(cfg, "n_routed_experts", 1)
    total = 0.0
    for name, w in weights.items():
        if name in ("embed.weight", "model.embed_tokens.weight"):
            continue
        if isinstance(w, (QuantWeight, GroupQuantWeight)):
            b = w.qweight.numel() + w.scale.numel() * w.scale.element_size()
        elif isinstance(w, FakeQuant):
            b = w.q.numel() + (2 if w.fp16 else 4) * w.d.numel()
        elif isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype != torch.int64:
            b = w.numel() * w.element_size()
        else:
            continue
        total += b * (frac if ".ffn.experts." in name else 1.0)
    return total / 1e9


def variants(base: dict, cfg, groups: list[int]) -> dict:
    spec = models.spec_for_config(cfg)
    w8a8 = [n for n in base if spec.is_w8a8_weight(n)]
    cls = {c: [n for n in base if re.match(rx, n)] for c, rx in CLASSES.items()}
    every = w8a8 + [n for names in cls.values() for n in names]
    out = {"w8a8": ("int8", w8a8, None)}
    for c, names in cls.items():
        if names:
            out[f"w8a8+{c}"] = ("int8", w8a8 + names, None)
    out["int8"] = ("int8", every, None)
    out["q8_0"] = ("fq", every, (32, True))
    out["int8_g32"] = ("g32", every, None)
    for g in groups:
        out[f"g{g}"] = ("fq", every, (g, False))
    return out


def build(base: dict, kind: str, names: list[str], fq) -> dict:
    w = dict(base)
    for n in names:
        if kind == "int8":
            w[n] = quantize_weight(base[n])
        elif kind == "g32":
            w[n] = quantize_weight_grouped(base[n], 32)
        else:
            w[n] = FakeQuant(base[n], *fq)
    return w


def run(weights: dict, cfg, ids: list[int]) -> torch.Tensor:
    eng = models.spec_for_config(cfg).make_engine(weights, cfg, dtype=torch.bfloat16, max_seq_len=len(ids),
                                                  backend="reference")
    _, logits = eng.prefill([ids])
    return logits[0].float()


def kl_rows(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_out)`` per position (natural log), float32 [T]."""
    lp, lq = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    kl = kl_rows(ref, out)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "cos": float(F.cosine_similarity(ref, out, dim=-1).mean()),
            "top1": float((ref.argmax(-1) == out.argmax(-1)).float().mean() * 100)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", default="128,32", help="finer INT8 scale groups to try")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--json", default=None)
    ap.add_argument("--paired", default=None,
                    help="a variant to compare every other one with position by position: mean KL "
                         "difference and its standard error (is a gap more than the token sample's noise?)")
    args = ap.parse_args(argv)
    cfg, base = load_checkpoint(args.checkpoint, dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=gen).tolist()
    groups = [int(g) for g in args.groups.split(",") if g]
    t0 = time.time()
    with patched_reference():
        ref = run(base, cfg, ids)
    print(f"bf16 run: {time.time() - t0:.1f} s; {cfg.summary()}; {args.tokens} tokens", flush=True)
    rows = {"bf16": {"kl_mean": 0.0, "kl_p99": 0.0, "cos": 1.0, "top1": 100.0,
                     "gb_per_token": weight_bytes(base, cfg)}}
    per_pos: dict[str, torch.Tensor] = {}
    todo = variants(base, cfg, groups)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    print(f"{'variant':28s} {'GB/tok':>7s} {'KL mean':>10s} {'KL p99':>10s} {'cos':>9s} {'top1 %':>7s}")
    for name, (kind, names, fq) in todo.items():
        w = build(base, kind, names, fq)
        with patched_reference():
            out = run(w, cfg, ids)
        r = compare(ref, out) | {"gb_per_token": weight_bytes(w, cfg), "weights": len(names)}
        rows[name] = r
        per_pos[name] = kl_rows(ref, out).double()
        print(f"{name:28s} {r['gb_per_token']:7.3f} {r['kl_mean']:10.3e} {r['kl_p99']:10.3e} "
              f"{r['cos']:9.6f} {r['top1']:7.2f}", flush=True)
        del w, out
    if args.paired in per_pos:
        b = per_pos[args.paired]
        print(f"paired against {args.paired} (KL difference per position, mean +- standard error; "
              f"< 0: closer to bf16 than {args.paired}):")
        for name, k in per_pos.items():
            if name != args.paired:
                d = k - b
                se = float(d.std() / d.numel() ** 0.5)
                rows[name]["paired"] = {"vs": args.paired, "mean_diff": float(d.mean()), "se": se,
                                        "closer_positions_pct": float((d < 0).double().mean() * 100)}
                print(f"  {name:26s} {float(d.mean()):+.3e} +- {se:.3e}  (closer at {float((d < 0).double().mean()) * 100:.1f} % "
                      "of positions)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "tokens": args.tokens, "seed": args.seed,
                       "model": cfg.summary(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
