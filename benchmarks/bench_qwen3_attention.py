"""Paged decode attention benchmark: ``kernels.qwen3.attention.paged_attention`` vs a torch
baseline (gather the pages + bf16 SDPA), against the DRAM read bandwidth measured in the
same run.

    python benchmarks/bench_qwen3_attention.py [--batch 1,4,16] [--context 4096]
        [--block-sizes 16,64] [--reps 9] [--json PATH] [--no-torch]

What is measured (Qwen3-32B attention dims by default: 64 q heads, 8 kv heads, D 128, bf16
KV cache, every sequence at ``--context`` tokens, one query row per sequence):

* **bandwidth**: ``bench_gemm.Bandwidth`` (Numba float32/int8 ``prange`` sums over a
  ``--bw-mb`` MiB array, best of the three medians of 3 runs), measured right before each
  configuration is timed, and the same 4-stream sum over the configuration's own cache
  copies ("same pages"): this machine gives ~50 or ~85 GB/s depending on where an
  allocation lands, so the probe array and the caches can differ.
* **kernel**: median of ``--reps`` calls after ``--warmup`` untimed ones. Each call uses the
  next of several distinct cache copies (random block tables, i.e. scattered pages, like a
  real paged pool) whose total is >= ``--cold-mb`` (3x the 32 MiB L3 by default), so the
  K/V bytes come from DRAM.
* **roofline**: K+V bytes read (``T·context·nkv·D·2 B·2``) / bandwidth; "% roofline" is
  roofline time / kernel time.
* **torch** (same copies and repetitions): ``index_select`` of the pages, then either
  ``scaled_dot_product_attention`` with each kv group's g query heads as g query rows
  (bf16; ``enable_gqa=True`` is ~10x slower here because it expands K/V) or bf16
  ``matmul`` / fp32 softmax / bf16 ``matmul``; the faster one is the baseline.
* **contention**: CPU time of other processes during each timed block (``/proc/stat``);
  a block where it exceeds ``--max-foreign`` is repeated (up to ``--retries``) after waiting
  for a quiet machine, and the JSON records it. 2-thread OpenMP code slows down by orders of
  magnitude when another process holds a core, so only quiet blocks are meaningful.

Not a test: exits 0 unless something crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numba
from bench_gemm import Bandwidth, Contention, wait_quiet

from llm_kernels.kernels.common import jit
from llm_kernels.kernels.qwen3 import attention as qattn


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=_ints, default=[1, 4, 16], help="sequences (= query rows)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--block-sizes", type=_ints, default=[16, 64])
    p.add_argument("--nq", type=int, default=64)
    p.add_argument("--nkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--reps", type=int, default=9, help="timed calls per configuration (>= 7)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cold-mb", type=float, default=96.0, help="min total size of the rotated cache copies")
    p.add_argument("--bw-mb", type=int, default=512, help="bandwidth probe array size (MiB)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--max-foreign", type=float, default=0.05, help="max CPU share of other processes")
    p.add_argument("--retries", type=int, default=6)
    p.add_argument("--wait-quiet", type=float, default=30.0, help="max seconds to wait for a quiet machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


class Case:
    """Rotated cache copies and inputs of one (batch, block size) configuration."""

    def __init__(self, T: int, ctx: int, BS: int, nq: int, nkv: int, D: int, dtype: torch.dtype,
                 cold_bytes: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.T, self.ctx, self.BS, self.nq, self.nkv, self.D, self.dtype = T, ctx, BS, nq, nkv, D, dtype
        self.nb = math.ceil(ctx / BS)
        NB = T * self.nb
        esz = torch.finfo(dtype).bits // 8
        self.kv_bytes = T * ctx * nkv * D * esz * 2
        per_copy = 2 * NB * nkv * BS * D * esz
        self.copies = []
        for _ in range(max(2, math.ceil(cold_bytes / per_copy))):
            kc = torch.empty(NB, nkv, BS, D, dtype=dtype)
            vc = torch.empty_like(kc)
            for c in (kc, vc):
                for i in range(0, NB, 256):
                    c[i:i + 256] = torch.randn(c[i:i + 256].shape, generator=g).to(dtype)
            bt = torch.randperm(NB, generator=g).reshape(T, self.nb).to(torch.int32)
            self.copies.append((kc, vc, bt))
        self.q = torch.randn(T, nq, D, generator=g).to(dtype).float()
        self.seq = torch.arange(T, dtype=torch.int32)
        self.cl = torch.full((T,), ctx, dtype=torch.int32)
        self.scale = D ** -0.5
        self.i = 0

    def page_arrays(self) -> list[np.ndarray]:
        """The K/V copies as numpy arrays (for the same-pages bandwidth probe)."""
        return [c.view(torch.int16).numpy() if c.dtype == torch.bfloat16 else c.numpy()
                for kc, vc, _ in self.copies for c in (kc, vc)]

    def kernel(self):
        kc, vc, bt = self.copies[self.i % len(self.copies)]
        self.i += 1
        return qattn.paged_attention(self.q, kc, vc, bt, self.seq, self.cl, self.scale, self.dtype)

    def _dense(self):
        kc, vc, bt = self.copies[self.i % len(self.copies)]
        self.i += 1
        T, nkv, D = self.T, self.nkv, self.D
        idx = bt.reshape(-1).long()

        def dense(c):
            x = c.index_select(0, idx).view(T, self.nb, nkv, self.BS, D).permute(0, 2, 1, 3, 4)
            return x.reshape(T, nkv, self.nb * self.BS, D)[:, :, :self.ctx]

        # decode: the g query heads of a kv group are g "query rows" against its K/V
        return self.q.to(self.dtype).view(T, nkv, self.nq // nkv, D), dense(kc), dense(vc)

    def torch_sdpa(self):
        """Gather + ``scaled_dot_product_attention`` (per kv group; ``enable_gqa=True`` on
        ``[T, nq, 1, D]`` is ~10x slower on this CPU because it expands K/V)."""
        q, k, v = self._dense()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale).float().reshape(
            self.T, self.nq * self.D)

    def torch_bmm(self):
        """Gather + bf16 matmul, fp32 softmax rounded to bf16, bf16 matmul (eager-style)."""
        q, k, v = self._dense()
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float() * self.scale, -1).to(self.dtype)
        return torch.matmul(p, v).float().reshape(self.T, self.nq * self.D)


def _timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def measure(case: Case, bw: Bandwidth, args) -> dict:
    """One quiet block: bandwidth, kernel, torch (retried while contended)."""
    res: dict = {}
    for attempt in range(args.retries + 1):
        wait_quiet(args.wait_quiet, args.max_foreign)
        with Contention() as c:
            b = bw.measure(reps=3)
            pages = bw.same_pages(case.page_arrays(), reps=2 * len(case.copies))
            tk = _timed(case.kernel, args.warmup, args.reps)
            ts = [] if args.no_torch else _timed(case.torch_sdpa, args.warmup, args.reps)
            tb = [] if args.no_torch else _timed(case.torch_bmm, args.warmup, args.reps)
        res = {"bandwidth_gbs": b["bw"], "bandwidth_detail": b, "pages_gbs": pages, "kernel_s": tk,
               "torch_sdpa_s": ts, "torch_bmm_s": tb, "foreign_cpu": c.foreign, "attempt": attempt}
        if c.foreign <= args.max_foreign:
            break
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(numba.get_num_threads())
    bw = Bandwidth(args.bw_mb << 20)
    rows = []
    print(f"load {os.getloadavg()[0]:.2f}; numba threads {numba.get_num_threads()}, torch threads "
          f"{torch.get_num_threads()}; path {'vdpbf16ps' if qattn.USE_BF16_DOT else 'plain'}", flush=True)
    for BS in args.block_sizes:
        for T in args.batch:
            case = Case(T, args.context, BS, args.nq, args.nkv, args.head_dim, dtype, args.cold_mb * 1e6,
                        args.seed + 1000 * BS + T)
            out_k = case.kernel()
            err = None
            if not args.no_torch:
                case.i -= 1
                out_t = case.torch_sdpa()
                err = float((out_k - out_t).abs().max() / out_t.abs().max())
            r = measure(case, bw, args)
            tk = statistics.median(r["kernel_s"])
            t_sdpa = statistics.median(r["torch_sdpa_s"]) if r["torch_sdpa_s"] else float("nan")
            t_bmm = statistics.median(r["torch_bmm_s"]) if r["torch_bmm_s"] else float("nan")
            tt = min(t_sdpa, t_bmm)
            roof = case.kv_bytes / (r["bandwidth_gbs"] * 1e9)
            roof_pages = case.kv_bytes / (r["pages_gbs"] * 1e9)
            row = {"batch": T, "block_size": BS, "context": args.context, "copies": len(case.copies),
                   "kv_bytes": case.kv_bytes, "kernel_ms": tk * 1e3, "kernel_gbs": case.kv_bytes / tk / 1e9,
                   "roofline_ms": roof * 1e3, "pct_roofline": 100 * roof / tk,
                   "pct_roofline_pages": 100 * roof_pages / tk, "torch_sdpa_ms": t_sdpa * 1e3,
                   "torch_bmm_ms": t_bmm * 1e3, "torch_ms": tt * 1e3, "torch_over_kernel": tt / tk,
                   "max_rel_diff_vs_torch": err, **r}
            rows.append(row)
            print(f"T={T:3d} BS={BS:3d}: kernel {tk * 1e3:7.3f} ms {row['kernel_gbs']:5.1f} GB/s "
                  f"({row['pct_roofline']:5.1f} % of {r['bandwidth_gbs']:.1f} GB/s; {row['pct_roofline_pages']:5.1f} % "
                  f"of same-pages {r['pages_gbs']:.1f})  torch sdpa {t_sdpa * 1e3:.3f} bmm {t_bmm * 1e3:.3f} ms "
                  f"(x{row['torch_over_kernel']:.1f})  foreign cpu {r['foreign_cpu']:.2f}", flush=True)
            del case
    print()
    print("| batch | block | kernel ms | GB/s | probe BW GB/s | % roofline | same-pages BW | % roofline (pages) "
          "| torch SDPA ms | torch bmm ms | best torch / kernel | foreign CPU |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['block_size']} | {r['kernel_ms']:.3f} | {r['kernel_gbs']:.1f} | "
              f"{r['bandwidth_gbs']:.1f} | {r['pct_roofline']:.1f} | {r['pages_gbs']:.1f} | "
              f"{r['pct_roofline_pages']:.1f} | {r['torch_sdpa_ms']:.3f} | {r['torch_bmm_ms']:.3f} | "
              f"{r['torch_over_kernel']:.1f} | {r['foreign_cpu']:.2f} |")
    if args.json:
        meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": platform.processor() or platform.machine(), "numba_threads": numba.get_num_threads(),
                "dispatch": jit.dispatch_info(), "use_bf16_dot": qattn.USE_BF16_DOT,
                "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
