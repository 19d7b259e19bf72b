"""MXFP4 expert GEMMs (W4A8, weights kept 4-bit) vs the int8_g32 grouped GEMM and the
per-row INT8 (W8A8) GEMM on DeepSeek-V4 Flash routed-expert shapes, against the DRAM read
bandwidth measured in the same run.

    python benchmarks/bench_w4a8.py [OUT.json] [--rounds 7] [--reps 9] [--T 1,4,8]
                                    [--D 4096] [--I 2048] [--experts E]

What is measured (``docs/performance.md``, "MXFP4 experts, W4A8", has a run's figures):

* **One expert** = the two GEMMs of the fused MoE: ``[w1; w3]`` as one ``[2I, D]`` weight
  on ``x [T, D]`` and ``w2 [D, I]`` on ``h [T, I]`` (float32 inputs; per-call activation
  quantisation included, SwiGLU not). Variants: ``mxfp4`` (:mod:`.gemm_mxfp4`, the
  process's tier), ``int8_g32`` (:mod:`.gemm_group`), ``int8`` (per-row W8A8,
  :mod:`.gemm`). Each variant's experts rotate over copies totalling >= 320 MB, so every
  call streams its weights from DRAM (L3 32 MiB).
* ``--experts E`` (E >= 2): one call = a decode step's E experts, every one on all T tokens,
  as the fused ``moe`` runs them: the stacked one-region paths
  (:func:`llm_kernels.kernels.deepseek_v4.moe_multi.multi_mxfp4_raw` /
  ``multi_expert_raw``: ``[w1; w3]`` of all E in one region, SwiGLU, all w2 in one), the
  activations' quantisation included; ``int8_g32`` (no such path) is left out. Bytes = E
  experts'.
* **Bytes** = what the kernel reads: packed weights + scales (MXFP4: ``D·I·3/2`` nibble
  bytes + one UE8M0 byte per 32 weights; int8_g32: 1 B/weight + 2 B per 32; int8: 1 B/weight
  + 4 B per row). "% of BW" = ``bytes / t`` over the same round's bandwidth.
* **Bandwidth**: ``bench_gemm.Bandwidth`` (Numba ``prange`` sums over 1.5 GiB, the largest
  of three access patterns) measured at the start of every round.
* **Pairing**: within a round the variants alternate call by call (mxfp4, int8_g32, int8,
  mxfp4, ...), ``reps`` calls each per T; per round the median per (T, variant); reported
  figures are medians over rounds, ratios the median of the per-round ratios (this guest's
  bandwidth drifts between rounds, so only same-round ratios are meaningful). Rounds where
  other processes used > 5 % of the CPUs are repeated (``bench_gemm.Contention``).

Not a test: exits 0 unless something crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numba  # noqa: E402
from bench_gemm import Bandwidth, Contention, wait_quiet  # noqa: E402

from llm_kernels.kernels.common import jit  # noqa: E402
from llm_kernels.kernels.common.gemm import pack_w8a8, w8a8_linear  # noqa: E402
from llm_kernels.kernels.common.gemm_group import group_gemm_linear, pack_group_w8  # noqa: E402
from llm_kernels.kernels.common.gemm_mxfp4 import mxfp4_gemm_linear, pack_mxfp4  # noqa: E402
from llm_kernels.numerics.group_quant import GroupQuantWeight  # noqa: E402
from llm_kernels.numerics.mxfp4 import MXFP4Weight  # noqa: E402

COLD_BYTES = 320_000_000
CONTENTION_LIMIT = 0.05
VARIANTS = ("mxfp4", "int8_g32", "int8")


def _expert(kind: str, D: int, I: int, rng: np.random.Generator):
    """(gemm13, gemm2, bytes read) of one random expert of ``kind``."""
    if kind == "mxfp4":
        def mk(n, k):
            return pack_mxfp4(MXFP4Weight(torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8)),
                                          torch.from_numpy(rng.integers(118, 128, (n, k // 32), dtype=np.uint8))))
        p13, p2 = mk(2 * I, D), mk(D, I)
        return (lambda x: mxfp4_gemm_linear(x, p13)), (lambda h: mxfp4_gemm_linear(h, p2)), p13.nbytes + p2.nbytes
    if kind == "int8_g32":
        def mk(n, k):
            return pack_group_w8(GroupQuantWeight(torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8)),
                                                  torch.full((n, k // 32), 1e-3, dtype=torch.float16)))
        p13, p2 = mk(2 * I, D), mk(D, I)
        return (lambda x: group_gemm_linear(x, p13)), (lambda h: group_gemm_linear(h, p2)), p13.nbytes + p2.nbytes
    def mk(n, k):
        return pack_w8a8(rng.integers(-127, 128, (n, k), dtype=np.int8), np.full(n, 1e-3, np.float32))
    p13, p2 = mk(2 * I, D), mk(D, I)
    nb = sum(int(p.data.nbytes) + 4 * p.n for p in (p13, p2))
    return (lambda x: w8a8_linear(x, p13)), (lambda h: w8a8_linear(h, p2)), nb


def _moe_step(kind: str, D: int, I: int, E: int, rng: np.random.Generator):
    """(step(x), bytes read) of one decode step of ``E`` stacked experts of ``kind`` (the
    one-region paths of the fused ``moe``), every expert on all rows of ``x`` [T, D]."""
    from llm_kernels.kernels.common.quant import quant_rows
    from llm_kernels.kernels.deepseek_v4.moe import expert_pack, prepare_expert
    from llm_kernels.kernels.deepseek_v4.moe_multi import (multi_expert_raw, multi_mxfp4_raw, stack_experts,
                                                           stack_mxfp4_experts)
    from llm_kernels.numerics.quant import QuantWeight

    if kind == "mxfp4":
        def mk(n, k):
            return MXFP4Weight(torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8)),
                               torch.from_numpy(rng.integers(118, 128, (n, k // 32), dtype=np.uint8)))
        ps = [prepare_expert(mk(I, D), mk(I, D), mk(D, I)) for _ in range(E)]
        st = stack_mxfp4_experts([(p1.group, p2.pack) for p1, _, p2 in ps])
        nb = st.p13.data.nbytes + st.p13.sw8.nbytes + st.p2.data.nbytes + st.p2.sw8.nbytes

        def step(x):
            r = np.arange(x.shape[0])
            return multi_mxfp4_raw(x.numpy(), list(range(E)), [r] * E, st, 0.0, True)
        return step, nb

    def mk(n, k):
        return QuantWeight(torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8)),
                           torch.full((n,), 1e-3, dtype=torch.float32))
    packs = [expert_pack(mk(I, D), mk(I, D), mk(D, I)) for _ in range(E)]
    st = stack_experts(packs)
    nb = sum(int(p.data.nbytes) + 4 * p.n for pk in packs for p in (pk.p13, pk.p2))

    def step(x):
        xq, sx = quant_rows(x)
        r = np.arange(x.shape[0])
        return multi_expert_raw(xq, sx, list(range(E)), [r] * E, st, 0.0, True)
    return step, nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=None, help="result JSON (optional)")
    ap.add_argument("--D", type=int, default=4096, help="hidden size (w1/w3 K, w2 N)")
    ap.add_argument("--I", type=int, default=2048, help="expert intermediate size")
    ap.add_argument("--T", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=9, help="timed calls per (round, T, variant)")
    ap.add_argument("--experts", type=int, default=1,
                    help="experts per call: >= 2 runs a decode step's E experts through the stacked one-region "
                         "paths (mxfp4 and int8 only)")
    ap.add_argument("--wait-quiet", type=float, default=20.0)
    ap.add_argument("--max-retries", type=int, default=6)
    a = ap.parse_args(argv)
    Ts = [int(v) for v in a.T.split(",")]
    D, I, E = a.D, a.I, a.experts
    variants = VARIANTS if E < 2 else ("mxfp4", "int8")
    print(f"tier {jit.TIER} (path {jit.dispatch_path()}, CPU best {jit.CPU_TIER}), "
          f"{numba.get_num_threads()} threads; expert D={D} I={I}"
          f"{f', {E} experts per call (stacked, one region per weight)' if E >= 2 else ''}", flush=True)
    rng = np.random.default_rng(0)
    experts, nbytes, copies = {}, {}, {}
    for v in variants:
        if E >= 2:
            def make(v=v):
                step, nb = _moe_step(v, D, I, E, rng)
                return step, (lambda h: None), nb
        else:
            def make(v=v):
                return _expert(v, D, I, rng)
        first = make()
        n = max(2, math.ceil(COLD_BYTES / first[2]))
        experts[v] = [first] + [make() for _ in range(n - 1)]
        nbytes[v], copies[v] = first[2], n
        print(f"  {v}: {n} copies x {first[2] / 1e6:.2f} MB", flush=True)
    xs = {T: torch.from_numpy(rng.standard_normal((T, D), dtype=np.float32)) for T in Ts}
    hs = {T: torch.from_numpy(rng.standard_normal((T, I), dtype=np.float32)) for T in Ts}
    idx = dict.fromkeys(variants, 0)

    def call(v, T):
        g13, g2, _ = experts[v][idx[v] % len(experts[v])]
        idx[v] += 1
        t0 = time.perf_counter()
        g13(xs[T])
        g2(hs[T])
        return time.perf_counter() - t0

    for v in variants:  # compile / first touch
        for T in Ts:
            for _ in range(3):
                call(v, T)
    bw = Bandwidth()
    rounds, r = [], 0
    while sum(x["clean"] for x in rounds) < a.rounds and r < a.rounds + a.max_retries:
        wait_quiet(a.wait_quiet)
        with Contention() as c:
            b = bw.measure()["bw"]
            med = {}
            for T in Ts:
                ts = {v: [] for v in variants}
                for v in variants:
                    call(v, T)                               # untimed: thread wake-up
                for i in range(a.reps):
                    order = variants[i % len(variants):] + variants[:i % len(variants)]
                    for v in order:
                        ts[v].append(call(v, T))
                for v in variants:
                    med[f"{v}/{T}"] = statistics.median(ts[v])
        ok = c.foreign <= CONTENTION_LIMIT
        rounds.append({"round": r, "bw_gbs": b, "median_s": med, "foreign_cpu": c.foreign, "clean": ok})
        print(f"  round {r}: BW {b:.1f} GB/s, mxfp4 T=1 {nbytes['mxfp4'] / med['mxfp4/1'] / 1e9 if 1 in Ts else 0:.1f} "
              f"GB/s, other processes {100 * c.foreign:.0f}% CPU{'' if ok else ' -> contended, repeated'}",
              flush=True)
        r += 1
    use = [x for x in rounds if x["clean"]]
    if len(use) < 3:
        print(f"only {len(use)} clean rounds: reporting all {len(rounds)} (contended)", flush=True)
        use = rounds
    bw_med = statistics.median(x["bw_gbs"] for x in use)
    print(f"\ntier {jit.TIER}; {len(use)} rounds; DRAM read BW (median) {bw_med:.1f} GB/s")
    print(f"{'T':>3} {'variant':>9} {'MB':>7} {'median ms':>10} {'GB/s':>7} {'% BW':>6} {'t / t_mxfp4':>12}")
    summary = []
    for T in Ts:
        for v in variants:
            t = statistics.median(x["median_s"][f"{v}/{T}"] for x in use)
            pct = statistics.median(nbytes[v] / x["median_s"][f"{v}/{T}"] / 1e9 / x["bw_gbs"] for x in use)
            ratio = statistics.median(x["median_s"][f"{v}/{T}"] / x["median_s"][f"mxfp4/{T}"] for x in use)
            summary.append({"T": T, "variant": v, "bytes": nbytes[v], "median_s": t, "gbs": nbytes[v] / t / 1e9,
                            "pct_bw": 100 * pct, "ratio_to_mxfp4": ratio})
            print(f"{T:>3} {v:>9} {nbytes[v] / 1e6:>7.2f} {1e3 * t:>10.3f} {nbytes[v] / t / 1e9:>7.1f} "
                  f"{100 * pct:>6.1f} {ratio:>12.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"tier": jit.TIER, "dispatch": jit.dispatch_info(), "D": D, "I": I,
                                           "experts": E, "copies": copies, "bw_median_gbs": bw_med, "summary": summary,
                                           "rounds": rounds, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                          indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
