"""Fused Qwen3 projection stages vs the torch reference at Qwen3-32B dimensions, against the
DRAM read bandwidth measured in the same run.

    python benchmarks/bench_qwen3_proj.py [--T 1,4,16] [--stages qkv,o,gate_up,down]
        [--modes w8a8,bf16] [--reps 7] [--rounds 1] [--json PATH] [--no-reference]

Stages (``llm_kernels.kernels.qwen3``; hidden 5120, nq·D 8192, nkv·D 1024, intermediate
25600): ``input_norm_qkv`` (qkv), ``o_proj_residual_norm`` (o), ``gate_up_swiglu``
(gate_up), ``down_residual`` (down). Activations are bf16-valued float32 (``dtype=bf16``);
``w8a8`` = ``QuantWeight`` projections (random INT8, per-channel fp32 scales), ``bf16`` =
bfloat16 weights. Norm gains are bf16 in both modes.

Implementations: ``fused`` (the stage as the runtime calls it); in bf16 mode also
``fused/gemv`` (Numba ``vdpbf16ps`` GEMV forced at every T) and ``fused/onednn`` (torch's
bf16 ``F.linear`` + the Numba prologue/epilogue forced): the measurement behind
``proj_common.BF16_GEMV_MAX_T``; ``reference`` (``llm_kernels.reference.qwen3``: torch; its
W8A8 GEMM is the float64 golden, so its ratio says little about speed).

Method, per (stage, mode) block and round: wait until other processes are idle (they share
the 2 cores; a busy neighbour stretches 2-thread OpenMP regions by up to 100x); build >= 2
weight copies totalling >= 512 MB (16x the 32 MiB L3: with a single 131 MB copy the L3 kept
part of the weights between calls and down_residual "read" at 128 % of the bandwidth), and
time every (T, impl): 2 untimed calls, then ``--reps`` timed calls walking through the
copies, each right after a bandwidth probe. The read bandwidth of this VM jumps between ~35,
~55 and ~85 GB/s within seconds AND depends on where an allocation landed (copies of one
weight built one after the other streamed at 80 vs 44 GB/s), so two rooflines are reported:

* "BW" / "%roof": the probe, a 128 MiB 4-stream Numba sum over the next slice of a 1.5 GiB
  array of distinct values (4x L3) right before the call; "%roof" is the median over the
  timed calls of ``bytes / t_i / probe_i`` (the large streaming read measured in the run);
* "pgBW" / "%pages": the same read over the very pages the call streams (the packed INT8
  weight, or the bf16 weights in place), per copy, median of 3 reads with the copies read in
  turn, before and after the timed calls (the larger); "%pages" is the median over the calls
  of ``bytes / t_i / pgBW(copy_i)``.

The block bandwidth (best of three Numba sums over the whole 1.5 GiB array, median of 5
runs each, ``bench_gemm.Bandwidth``, before and after) is printed per round and saved. A
round during which other processes used > 5 % of the CPUs is repeated (``--max-retries``).
Bytes per stage: ``models.qwen3.roofline`` (weights incl. fp32 scales and bf16 norm gains,
activations at 4 B: the tensors are float32). Not a test: exits 0 unless something crashed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_gemm as BG
import numba

from llm_kernels.models.qwen3.config import qwen3_preset
from llm_kernels.models.qwen3 import roofline as RQ
from llm_kernels.kernels.common import jit
from llm_kernels.kernels.qwen3 import mlp as KM
from llm_kernels.kernels.qwen3 import o_proj as KO
from llm_kernels.kernels.qwen3 import proj_common as PC
from llm_kernels.kernels.qwen3 import qkv_proj as KQ
from llm_kernels.numerics.quant import QuantWeight
from llm_kernels.reference.qwen3 import mlp as RM
from llm_kernels.reference.qwen3 import o_proj as RO
from llm_kernels.reference.qwen3 import qkv_proj as RQK

STAGES = {"qkv": "input_norm_qkv", "o": "o_proj_residual_norm", "gate_up": "gate_up_swiglu",
          "down": "down_residual"}
COLD_BYTES = 512_000_000
MIN_COPIES = 2
EPS = 1e-6
BF16 = torch.bfloat16


def _shapes(cfg) -> dict:
    D, I, Q, KV = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"qkv": [(Q, D), (KV, D), (KV, D)], "o": [(D, Q)], "gate_up": [(I, D), (I, D)],
            "down": [(D, I)]}


def _weight(shape, mode: str, rng: np.random.Generator):
    n, k = shape
    if mode == "w8a8":
        q = torch.from_numpy(rng.integers(-127, 128, size=(n, k), dtype=np.int8))
        s = torch.from_numpy((rng.random(n, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32))
        return QuantWeight(q, s)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    return torch.randn(n, k, generator=g, dtype=BF16) * (1.0 / math.sqrt(k))


_MODES = {"qkv": PC.MODE_SPLIT, "o": PC.MODE_RES, "gate_up": PC.MODE_SWIGLU, "down": PC.MODE_RES}


def _prepare(ws: tuple, stage: str) -> tuple:
    """The weights as the runtime hands them to the fused stage: W8A8 stages prepared once
    (packed, ``proj_common.prepare_stage``), bf16 weights as they are."""
    return PC.prepare_stage(ws, _MODES[stage]) if isinstance(ws[0], QuantWeight) else ws


def _kernel_pages(ws: tuple, stage: str) -> list[np.ndarray]:
    """The arrays the fused stage streams for one (prepared) weight copy: the packed INT8
    weight (W8A8) or the bf16 weights themselves (natural layout, read in place)."""
    if isinstance(ws[0], QuantWeight):
        return [PC.stage_w8a8(ws, _MODES[stage]).pk.data]
    return [w.view(torch.int16).numpy() for w in ws]


def _copy_bw(arrays: list[np.ndarray], parts: np.ndarray) -> float:
    """GB/s of one 4-stream Numba sum over the arrays (one weight copy's pages)."""
    views = [a.reshape(-1).view(np.uint8) for a in arrays]
    views = [v[: v.size - v.size % 1024].view(np.float32) for v in views]
    t0 = time.perf_counter()
    for v in views:
        BG._sum_f32_4s(v, parts)
    return sum(v.nbytes for v in views) / (time.perf_counter() - t0) / 1e9


def _copies_bw(pages: list[list[np.ndarray]], parts: np.ndarray, reps: int = 3) -> list[float]:
    """Per weight copy: median GB/s of ``reps`` reads of its pages, the copies read in turn
    (each re-read only after all the others: no L3 reuse)."""
    runs = [[] for _ in pages]
    for _ in range(reps):
        for i, pg in enumerate(pages):
            runs[i].append(_copy_bw(pg, parts))
    return [statistics.median(r) for r in runs]


def _inputs(stage: str, cfg, T: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    D, I, Q = cfg.hidden_size, cfg.intermediate_size, cfg.q_size

    def r(n):
        return torch.randn(T, n, generator=g).to(BF16).float()

    return {"qkv": {"x": r(D)}, "o": {"x": r(Q), "res": r(D)}, "gate_up": {"x": r(D)},
            "down": {"x": r(I), "res": r(D)}}[stage]


def _call(stage: str, impl: str, ws: tuple, v: dict, nw: torch.Tensor):
    ref = impl == "reference"
    if stage == "qkv":
        f = RQK.input_norm_qkv if ref else KQ.input_norm_qkv
        return lambda: f(v["x"], nw, *ws, EPS, BF16)
    if stage == "o":
        f = RO.o_proj_residual_norm if ref else KO.o_proj_residual_norm
        return lambda: f(v["x"], ws[0], v["res"], nw, EPS, BF16)
    if stage == "gate_up":
        f = RM.gate_up_swiglu if ref else KM.gate_up_swiglu
        return lambda: f(v["x"], *ws, BF16)
    f = RM.down_residual if ref else KM.down_residual
    return lambda: f(v["x"], ws[0], v["res"], BF16)


class _GemvPolicy:
    """Context manager forcing the bf16 GEMV threshold (``fused/gemv``, ``fused/onednn``)."""

    def __init__(self, impl: str):
        self.val = {"fused/gemv": 1 << 30, "fused/onednn": 0}.get(impl)

    def __enter__(self):
        self.old = PC.BF16_GEMV_MAX_T
        if self.val is not None:
            PC.BF16_GEMV_MAX_T = self.val

    def __exit__(self, *exc):
        PC.BF16_GEMV_MAX_T = self.old
        return False


class _Probe:
    """Bandwidth probe paired with every timed call: a 4-stream Numba sum over the next
    128 MiB slice (4x L3) of the 1.5 GiB bandwidth array -> GB/s."""

    def __init__(self, bw: BG.Bandwidth, nbytes: int = 128 << 20):
        n = nbytes // 4
        self.views = [bw.f[i * n:(i + 1) * n] for i in range(bw.f.size // n)]
        self.parts = np.empty(256, np.float32)
        self.i = 0

    def __call__(self) -> float:
        v = self.views[self.i % len(self.views)]
        self.i += 1
        t0 = time.perf_counter()
        BG._sum_f32_4s(v, self.parts)
        return v.nbytes / (time.perf_counter() - t0) / 1e9


def _time_impl(stage, impl, copies, v, nw, reps: int, probe: _Probe) -> list[tuple[float, float, int]]:
    """(seconds, probe GB/s right before, weight copy) of ``reps`` timed calls after 2
    untimed ones; the calls walk through the weight copies (each timed call uses the least
    recently used)."""
    calls = [_call(stage, impl, ws, v, nw) for ws in copies]
    with _GemvPolicy(impl):
        for i in range(2):
            calls[i % len(calls)]()
        out = []
        for i in range(2, reps + 2):
            f = calls[i % len(calls)]
            b = probe()
            t0 = time.perf_counter()
            f()
            out.append((time.perf_counter() - t0, b, i % len(calls)))
    return out


def _bandwidth() -> BG.Bandwidth:
    bw = BG.Bandwidth()
    bw.f[:] = np.arange(bw.f.size, dtype=np.float32)  # distinct values on every page
    return bw


def run_block(stage, mode, cfg, Ts, reps, rounds, max_retries, wait_s, with_ref, bw, log) -> tuple[list, list]:
    """All (T, impl) rows of one (stage, mode): builds the weight copies, times, frees them."""
    rng = np.random.default_rng(sum(map(ord, stage + mode)))
    shapes = _shapes(cfg)[stage]
    quant = "w8a8" if mode == "w8a8" else "bf16"
    wbytes = RQ.stage_breakdown(cfg, STAGES[stage], 1, 0, quant, act_itemsize=4).weights
    ncopy = max(MIN_COPIES, math.ceil(COLD_BYTES / wbytes))
    t0 = time.time()
    copies = [tuple(_weight(s, mode, rng) for s in shapes) for _ in range(ncopy)]
    nw = (1 + 0.1 * torch.randn(cfg.hidden_size)).to(BF16)
    impls = ["fused"] + (["fused/gemv", "fused/onednn"] if mode == "bf16" and PC.USE_BF16_GEMV else [])
    impls += ["reference"] if with_ref else []
    ins = {T: _inputs(stage, cfg, T, T) for T in Ts}
    prepared = [_prepare(ws, stage) for ws in copies]  # the fused side reads these (packed once)
    for ws in prepared:  # compile untimed
        for T in Ts:
            _call(stage, "fused", ws, ins[T], nw)()
    log(f"{stage}/{mode}: {ncopy} copies x {wbytes / 1e6:.0f} MB weights, built+packed in {time.time() - t0:.0f} s")
    pages = [_kernel_pages(ws, stage) for ws in prepared]
    parts = np.empty(256, np.float32)
    probe = _Probe(bw)
    raw = []
    r = clean = 0
    while clean < rounds and r < rounds + max_retries:
        BG.wait_quiet(wait_s)
        with BG.Contention() as c:
            b = bw.measure(5)
            cbw = _copies_bw(pages, parts)
            res = {(T, im): _time_impl(stage, im, copies if im == "reference" else prepared, ins[T], nw, reps, probe)
                   for T in Ts for im in impls}
            b2 = bw.measure(5)
            cbw = [max(a, b_) for a, b_ in zip(cbw, _copies_bw(pages, parts))]
            sp = statistics.median(cbw)
            b = dict(b, bw_before=b["bw"], bw_after=b2["bw"], bw=max(b["bw"], b2["bw"]))
        ok = c.foreign <= BG.CONTENTION_LIMIT
        clean += ok
        log(f"  round {r}: BW {b['bw']:.1f} GB/s, weight copies {min(cbw):.1f}-{max(cbw):.1f}, "
            f"other processes {100 * c.foreign:.0f}% CPU"
            + ("" if ok else " -> contended, repeated"))
        raw.append({"round": r, "bw": b, "same_pages": sp, "copies_gbs": cbw, "foreign_cpu": c.foreign,
                    "clean": ok, "runs_s": {f"{T}/{im}": [t for t, _, _ in ts] for (T, im), ts in res.items()},
                    "probe_gbs": {f"{T}/{im}": [b for _, b, _ in ts] for (T, im), ts in res.items()},
                    "copy": {f"{T}/{im}": [c for _, _, c in ts] for (T, im), ts in res.items()}})
        r += 1
    use = [x for x in raw if x["clean"]] or raw
    rows = []
    for T in Ts:
        nbytes = RQ.stage_bytes(cfg, STAGES[stage], T, 0, quant, act_itemsize=4)
        for im in impls:
            key = f"{T}/{im}"
            runs = [t for x in use for t in x["runs_s"][key]]
            probes = [b for x in use for b in x["probe_gbs"][key]]
            own = [x["copies_gbs"][c] for x in use for c in x["copy"][key]]
            t = statistics.median(runs)
            rows.append({
                "stage": STAGES[stage], "mode": mode, "T": T, "impl": im, "ms": 1e3 * t,
                "runs_ms": [1e3 * v for v in runs], "bytes": nbytes, "GBps": nbytes / t / 1e9,
                "bw_GBps": statistics.median(probes), "pages_GBps": statistics.median(own),
                "bw_block_GBps": statistics.median(x["bw"]["bw"] for x in use),
                "pct_roofline": 100 * statistics.median(nbytes / r / 1e9 / b for r, b in zip(runs, probes)),
                "pct_pages": 100 * statistics.median(nbytes / r / 1e9 / b for r, b in zip(runs, own)),
                "rounds_used": len(use)})
        ref = next((x["ms"] for x in rows if x["T"] == T and x["impl"] == "reference"), None)
        for x in rows:
            if x["T"] == T and ref is not None:
                x["speedup_vs_reference"] = ref / x["ms"]
    del copies, prepared, pages
    gc.collect()
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="1,4,16", help="token counts (comma separated)")
    ap.add_argument("--stages", default="qkv,o,gate_up,down", help=f"subset of {','.join(STAGES)}")
    ap.add_argument("--modes", default="w8a8,bf16", help="w8a8 and/or bf16")
    ap.add_argument("--preset", default="qwen3-32b")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per (round, T, impl), >= 7")
    ap.add_argument("--rounds", type=int, default=1, help="clean rounds per (stage, mode)")
    ap.add_argument("--max-retries", type=int, default=4)
    ap.add_argument("--wait-quiet", type=float, default=60.0, help="max seconds to wait for an idle machine")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--json", default=None, help="write all rows and raw runs to this JSON file")
    a = ap.parse_args(argv)
    Ts = [int(t) for t in a.T.split(",")]
    stages = a.stages.split(",")
    modes = a.modes.split(",")
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r}")
    for m in modes:
        if m not in ("w8a8", "bf16"):
            ap.error(f"unknown mode {m!r}")
    cfg = qwen3_preset(a.preset)
    torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    def log(msg):
        print(msg, flush=True)

    log(f"dispatch {jit.dispatch_path()} (VNNI={jit.HAS_VNNI}, AVX512_BF16={jit.HAS_AVX512BF16}), "
        f"threads numba {numba.get_num_threads()} / torch {torch.get_num_threads()}, "
        f"BF16_GEMV_MAX_T={PC.BF16_GEMV_MAX_T}")
    bw = _bandwidth()
    rows, raw = [], {}
    for mode in modes:
        for st in stages:
            rs, rr = run_block(st, mode, cfg, Ts, max(7, a.reps), a.rounds, a.max_retries, a.wait_quiet,
                               not a.no_reference, bw, log)
            rows += rs
            raw[f"{st}/{mode}"] = rr
            gc.collect()
    hdr = (f"{'stage':<22}{'mode':<6}{'T':>3}  {'impl':<13}{'ms':>9}{'GB/s':>7}{'BW':>6}{'%roof':>7}"
           f"{'pgBW':>6}{'%pages':>8}{'vs ref':>9}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for x in rows:
        sp = f"x{x['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in x and x["impl"] != "reference" else "-"
        print(f"{x['stage']:<22}{x['mode']:<6}{x['T']:>3}  {x['impl']:<13}{x['ms']:>9.3f}{x['GBps']:>7.1f}"
              f"{x['bw_GBps']:>6.0f}{x['pct_roofline']:>6.0f}%{x['pages_GBps']:>6.0f}{x['pct_pages']:>7.0f}%"
              f"{sp:>9}")
    if a.json:
        out = {"benchmark": "bench_qwen3_proj", "preset": a.preset, "Ts": Ts, "reps": a.reps,
               "dispatch": jit.dispatch_info(), "bf16_gemv_max_t": PC.BF16_GEMV_MAX_T,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows, "raw": raw}
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
