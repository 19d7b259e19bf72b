"""Accuracy of a release checkpoint (FP8 + MXFP4) run natively against the float model whose
weights are the dequantized release weights (issue 11's bar: logits cosine >= 0.999, greedy
ids compared over 128 tokens).

The float model (``load_checkpoint(quant="none")``: dequantized exactly, reference engine in
``--float-dtype``) greedily decodes ``--tokens`` tokens after a seeded random prompt of
``--prompt`` ids. Each variant (fused engine) is then

* teacher-forced on the same sequence: cosine of its logit rows against the float rows
  (mean and minimum over the decoded positions) and top-1 agreement;
* run free (greedy, same prompt): how many of its ids equal the float model's, and the
  first position where they differ.

Variants: ``native`` (the release as loaded by default: MXFP4 experts W4A8, FP8 -> int8_g32)
and, with ``--int8``, the dequantized model quantized to the ``int8`` scheme on load (all
per-row INT8, the experts too), for comparison.

Run::

    python benchmarks/release_accuracy.py --release /tmp/flash3_rel --tokens 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.kernels.common.jit import dispatch_tier


def _engine(w, cfg, dtype, backend, n):
    return models.spec_for_config(cfg).make_engine(w, cfg, dtype=dtype, max_seq_len=n, backend=backend,
                                                   consume_weights=True)


def greedy(eng, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """``n`` greedy ids after ``prompt`` and the logits rows that chose them [n, V]."""
    sid = eng.add_sequence()
    try:
        rows = [eng.step([sid], [prompt], logits_rows="last")[0][-1]]
        ids = [int(rows[-1].argmax())]
        for _ in range(n - 1):
            rows.append(eng.step([sid], [[ids[-1]]], logits_rows="last")[0][-1])
            ids.append(int(rows[-1].argmax()))
        return ids, torch.stack(rows)
    finally:
        eng.release(sid)


def forced(eng, prompt: list[int], ids: list[int]) -> torch.Tensor:
    """Logits rows [len(ids), V] predicting ``ids`` when fed ``prompt + ids[:-1]`` one at a time."""
    sid = eng.add_sequence()
    try:
        rows = [eng.step([sid], [prompt], logits_rows="last")[0][-1]]
        for t in ids[:-1]:
            rows.append(eng.step([sid], [[t]], logits_rows="last")[0][-1])
        return torch.stack(rows)
    finally:
        eng.release(sid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", required=True, help="release-format checkpoint directory")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--int8", action="store_true", help="also the dequantized model as all-INT8 (int8 on load)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    fdt = getattr(torch, args.float_dtype)
    n = args.prompt + args.tokens + 4

    t0 = time.perf_counter()
    cfg, w = load_checkpoint(args.release, dtype=fdt, quant="none", progress=False)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist()
    eng = _engine(w, cfg, fdt, "reference", n)
    del w
    ref_ids, ref_rows = greedy(eng, prompt, args.tokens)
    del eng
    print(f"{cfg.summary()}; CPU tier {dispatch_tier()}; float model ({args.float_dtype}, reference) "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    variants = {"native": dict(quant=None)}
    if args.int8:
        variants["int8 (all, on load)"] = dict(quant="int8")
    out = {"model": cfg.summary(), "tier": dispatch_tier(), "tokens": args.tokens, "variants": {}}
    for name, kw in variants.items():
        if kw["quant"] == "int8":  # the dequantized float model, every INT8-set weight per-row INT8
            cfg, w = load_checkpoint(args.release, dtype=torch.bfloat16, quant="none", progress=False)
            from llm_kernels.checkpoint.quantized import quantize_weights
            w = quantize_weights(w, cfg, scheme="int8")
        else:
            cfg, w = load_checkpoint(args.release, dtype=torch.bfloat16, progress=False)
        eng = _engine(w, cfg, torch.bfloat16, "fused", n)
        del w
        rows = forced(eng, prompt, ref_ids)
        cos = torch.nn.functional.cosine_similarity(rows.double(), ref_rows.double(), dim=-1)
        top1 = float((rows.argmax(-1) == ref_rows.argmax(-1)).double().mean())
        ids, _ = greedy(eng, prompt, args.tokens)
        same = sum(a == b for a, b in zip(ids, ref_ids))
        first = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
        del eng
        r = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1": top1,
             "greedy_same": same, "greedy_first_diff": first}
        out["variants"][name] = r
        print(f"{name:22s} cos mean {r['cos_mean']:.6f} min {r['cos_min']:.6f}; top1 {100 * top1:.1f} %; "
              f"greedy ids equal {same}/{args.tokens} (first difference at "
              f"{'none' if first is None else first})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
