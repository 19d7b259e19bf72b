"""Paired decode benchmark of two quantisation schemes of one checkpoint, in one process.

Both engines are built side by side (fused backend), then decode runs alternate between
them (A, B, A, B, ...) so that both see the same machine state: this guest's DRAM
bandwidth is bimodal (38 vs 55 GB/s within minutes), which makes two separate ``bench``
runs hard to compare. Reports per scheme the median decode tok/s over ``-r`` runs of ``-n``
steps (batch ``-b``, after an 8-token prompt; a warm-up run each first, not counted), the
weight bytes per token counted from the prepared weights, the median ratio B/A of the
paired runs, and the DRAM read bandwidth probed before and after.

A scheme may name its own checkpoint as ``QUANT@DIR`` (``@DIR`` alone: as stored), e.g. a
release checkpoint loaded natively against the same model converted to all-INT8.

Run::

    python benchmarks/bench_quant_pair.py --checkpoint /tmp/flash3 --schemes int8,int8_g32 -n 64 -r 7
    python benchmarks/bench_quant_pair.py --schemes int8@/tmp/flash3_deq,@/tmp/flash3_rel -n 64 -r 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_kernels import models
from llm_kernels.bench.core import measure_dram_bandwidth
from llm_kernels.bench.weight_bytes import bytes_per_step, decode_read_bytes
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.kernels.common.jit import dispatch_tier
from llm_kernels.runtime.memory import prompt_release


def decode_run(eng, vocab: int, n: int, b: int, seed: int) -> float:
    """tok/s of ``n`` decode steps of ``b`` sequences (random ids: the head's argmax is not
    what is measured) after an 8-token prefill each; the sequences are released after."""
    g = torch.Generator().manual_seed(seed)
    sids = [eng.add_sequence() for _ in range(b)]
    try:
        eng.step(sids, [torch.randint(0, vocab, (8,), generator=g).tolist() for _ in sids], logits_rows="last")
        toks = torch.randint(0, vocab, (n, b), generator=g).tolist()
        t0 = time.perf_counter()
        for row in toks:
            eng.step(sids, [[t] for t in row], logits_rows="last")
        return n * b / (time.perf_counter() - t0)
    finally:
        for s in sids:
            eng.release(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="the checkpoint of schemes without @DIR")
    ap.add_argument("--schemes", default="int8,int8_g32",
                    help="two --quant values A,B; QUANT@DIR loads DIR (@DIR: as stored)")
    ap.add_argument("-n", type=int, default=64, help="decode steps per run")
    ap.add_argument("-b", type=int, default=1, help="sequences per step")
    ap.add_argument("-r", type=int, default=7, help="paired runs")
    args = ap.parse_args(argv)
    names = args.schemes.split(",")
    if len(names) != 2:
        raise SystemExit("--schemes needs exactly two values, e.g. int8,int8_g32")
    prompt_release()
    engines, nbytes = {}, {}
    for q in names:
        quant, _, path = q.partition("@")
        path = path or args.checkpoint
        if path is None:
            raise SystemExit(f"scheme {q!r}: no checkpoint (give --checkpoint or QUANT@DIR)")
        cfg, w = load_checkpoint(path, dtype=torch.bfloat16, quant=quant or None, progress=False)
        spec = models.spec_for_config(cfg)
        engines[q] = spec.make_engine(w, cfg, dtype=torch.bfloat16, max_seq_len=args.n + 16, backend="fused",
                                      max_batch=args.b, consume_weights=True)
        del w
        nbytes[q] = bytes_per_step(decode_read_bytes(engines[q].w, cfg), args.b)
    print(f"{cfg.summary()}; CPU tier {dispatch_tier()}; torch threads {torch.get_num_threads()}")
    bw0 = measure_dram_bandwidth()
    for q in names:  # warm-up
        decode_run(engines[q], cfg.vocab_size, min(args.n, 8), args.b, 0)
    tps: dict[str, list[float]] = {q: [] for q in names}
    for r in range(args.r):
        for q in (names if r % 2 == 0 else names[::-1]):
            tps[q].append(decode_run(engines[q], cfg.vocab_size, args.n, args.b, r + 1))
        print(f"run {r + 1}/{args.r}: " + ", ".join(f"{q} {tps[q][-1]:.2f} t/s" for q in names), flush=True)
    bw1 = measure_dram_bandwidth()
    print(f"DRAM read bandwidth before / after: {bw0:.1f} / {bw1:.1f} GB/s")
    a, b = names
    for q in names:
        med = statistics.median(tps[q])
        print(f"{q:10s} median {med:7.2f} t/s  (min {min(tps[q]):.2f}, max {max(tps[q]):.2f});  "
              f"{nbytes[q] / 2**30:.3f} GiB per step -> {med * nbytes[q] / args.b / 1e9:.1f} GB/s of weights")
    ratio = statistics.median(y / x for x, y in zip(tps[a], tps[b]))
    print(f"paired ratio {b}/{a} (median of {args.r}): {ratio:.3f}; bytes ratio {nbytes[b] / nbytes[a]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
