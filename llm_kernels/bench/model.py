"""``python -m llm_kernels bench -p 512 -n 128 --checkpoint DIR``: the model-level benchmark,
shaped like llama.cpp's ``llama-bench``.

    python -m llm_kernels bench --checkpoint DIR -p 512 -n 128 [-d 0,4096] [-b 1,4] [-ub 256] [-r 5]
        [--backend fused|reference] [--quant none|w8a8|int8|int8_g32] [--dtype bfloat16|float32] [--json PATH]

The driver (:mod:`.driver`) runs this mode when ``-p``/``-n``/``-d``/``-b`` or ``-m``/``--model``
are given; without them ``bench`` is the per-layer benchmark. Any checkpoint of a registered
model (DeepSeek-V4, Qwen3; random or real, float or W8A8) is loaded with
:func:`~llm_kernels.checkpoint.load_checkpoint` and run through its spec's engine
(``spec.make_engine``), i.e. the whole model: embedding, every layer, the head.

Tests (the cartesian product of the lists, as llama-bench does):

* ``pp<P>`` (``@ d<D>``): one prompt of P tokens as one step with logits for the last row only
  (``engine.step([sid], [prompt], logits_rows="last")`` after ``add_sequence()``), chunked into
  steps of at most ``-ub`` rows (``n_ubatch``, llama-bench's name; 0 = one step); with a depth
  D, D tokens are prefilled first (untimed, chunked the same way). t/s = P / time.
* ``tg<N>`` (``@ d<D>``) (`` b<B>``): B sequences prefilled (untimed) with D tokens each (a short
  prompt of ``--tg-prompt`` tokens when D = 0), then N timed steps of one token per sequence
  (logits of every sequence). t/s = N·B / time (aggregate over the batch). The decode steps
  are never chunked; ``-ub`` applies to the untimed prefill.

Over ranks (``--nproc N [--pp K]``, or torchrun): every rank runs the same tests on its part
of the model, rank 0 reports; bytes are totals over the ranks (:mod:`.model_ranks`).

Several ``-ub`` values multiply the tests (as every list does); each row records its
``n_ubatch`` and the untimed setup seconds of each run (``setup_s``: the depth prefill).

Each test: one untimed warm-up run (``--warmup``), then ``-r`` timed repetitions, each on fresh
sequences (released afterwards). Reported: mean ± stddev of the per-repetition t/s (the
llama-bench column), median, min/max and spread ((max - min) / median). The first warm-up's
excess over the median is the first-call cost (Numba compile or cache load), printed on its
own line.

Bytes per decoded token are counted from the engine's prepared weights themselves
(:func:`decode_read_bytes`): every tensor at its storage size, packed W8A8 weights by their
packed storage (payload + per-channel scales + the VNNI row sums), the embedding one row per
token, MoE: the shared experts plus ``num_experts_per_tok`` routed experts per layer (mean size
of a routed expert of the layer) — every token reads k distinct experts; a B-sequence step reads
at most min(B·k, E) distinct routed experts (the upper bound is used for ``b`` tests). KV-cache
and activation reads are not counted (weights only). % roofline = bytes per step x steps/s /
DRAM bandwidth, the bandwidth being the mean of the probes before and after the tests
(:func:`~.core.measure_dram_bandwidth`). Prefill rows get no roofline (compute bound).
See ``docs/benchmarks.md`` ("Model-level benchmark").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .core import (
    bytes_arg,
    fmt_bytes,
    loadavg,
    machine_info,
    measure_dram_bandwidth,
    measure_int8_peak,
    write_results,
)
from ..runtime.engine_core import DEFAULT_PREFILL_CHUNK
from .trace import thread_info
from .model_ranks import decode_steps, read_bytes
from .weight_bytes import bytes_per_step, decode_read_bytes, weight_storage

__all__ = ["MODE_FLAGS", "wants_model_mode", "build_parser", "main", "decode_read_bytes", "weight_storage",
           "plan_tests", "TestSpec", "DEFAULT_JSON"]

#: Flags that select the model-level mode of ``python -m llm_kernels bench``.
MODE_FLAGS = ("-p", "--n-prompt", "-n", "--n-gen", "-d", "--n-depth", "-b", "--batch-size", "-m", "--model",
              "--nproc", "--pp", "--pipeline-parallel-size")  # over ranks: this mode only (.model_ranks)
DEFAULT_JSON = "bench_model.json"
_DTYPES = ("bfloat16", "float32")


def wants_model_mode(argv: list[str]) -> bool:
    """True when ``argv`` holds one of :data:`MODE_FLAGS` (also ``-p512`` / ``--n-prompt=512``)."""
    for a in argv:
        if a == "--":
            break
        head = a.split("=", 1)[0]
        if head in MODE_FLAGS:
            return True
        if len(a) > 2 and a[:2] in ("-p", "-n", "-d", "-b", "-m") and not a.startswith("--"):
            return True
    return False


# ============================================================================ arguments
def _int_list(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            v = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not v or any(x < minimum for x in v):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with "error: ..." (argparse's format, one line)
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm_kernels bench", description=(
        "Model-level benchmark (llama-bench style): prefill (ppN) and decode (tgN, at depth d, with b "
        "sequences) tokens/s of a whole checkpoint, with bytes per token, DRAM bandwidth and %% of roofline. "
        "Selected by -p/-n/-d/-b/--model; without them 'bench' is the per-layer benchmark."),
        epilog="See docs/benchmarks.md (Model-level benchmark).")
    p.add_argument("-m", "--model", "--checkpoint", dest="checkpoint", type=Path, default=None, metavar="DIR",
                   help="checkpoint directory (config.json + safetensors; any registered model)")
    p.add_argument("-p", "--n-prompt", type=_int_list(1), default=None, metavar="P[,P...]",
                   help="prompt lengths of the ppP tests (default 512 unless only -n is given)")
    p.add_argument("-n", "--n-gen", type=_int_list(1), default=None, metavar="N[,N...]",
                   help="decode steps of the tgN tests (default 128 unless only -p is given)")
    p.add_argument("-d", "--n-depth", type=_int_list(0), default=[0], metavar="D[,D...]",
                   help="context depth: tokens prefilled (untimed) before the timed part (default 0)")
    p.add_argument("-b", "--batch-size", type=_int_list(1), default=[1], metavar="B[,B...]",
                   help="sequences decoded together in the tg tests; t/s is the aggregate (default 1)")
    p.add_argument("-ub", "--ubatch-size", type=_int_list(0), default=[DEFAULT_PREFILL_CHUNK], metavar="U[,U...]",
                   help=f"chunked prefill: rows per engine step of a prompt or depth prefill (default "
                        f"{DEFAULT_PREFILL_CHUNK}, the engine's; 0 = the whole prompt in one step)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per test (default 1)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="torch and numba threads (default: as configured, usually the core count)")
    p.add_argument("--backend", choices=["fused", "reference"], default="fused", help="default fused")
    p.add_argument("--quant", choices=["none", "w8a8", "int8", "int8_g32"], default=None,
                   help="none = float weights; w8a8 / int8 / int8_g32 = the INT8 schemes (see generate --help; "
                        "quantized on load if the checkpoint is float); "
                        "default: as stored")
    p.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="activation / float weight dtype")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="cache capacity per sequence in tokens (default: what the tests need)")
    p.add_argument("--tg-prompt", type=int, default=8,
                   help="prompt tokens prefilled (untimed) before a tg test at depth 0 (default 8)")
    p.add_argument("--json", type=Path, default=None, help=f"result file (default ./{DEFAULT_JSON})")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="DRAM bandwidth in GB/s to use instead of probing it")
    p.add_argument("--bw-bytes", type=bytes_arg, default=int(1.5 * 2 ** 30),
                   help="array size of the bandwidth probe (default 1.5G)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--quiet", action="store_true", help="no progress lines (stderr)")
    from ..cli_ranks import add_rank_args

    add_rank_args(p, "bench")  # --nproc / --pp / --ep-timeout: over ranks, see .model_ranks
    return p


# ============================================================================ tests
class TestSpec:
    """One test: kind "pp" (prompt P) or "tg" (N steps), depth D, batch B, prefill chunk
    ``ubatch`` (rows per step of the prompt / depth prefill; 0 = whole)."""

    def __init__(self, kind: str, n: int, depth: int, batch: int, ubatch: int = DEFAULT_PREFILL_CHUNK):
        self.kind, self.n, self.depth, self.batch, self.ubatch = kind, n, depth, batch, ubatch

    @property
    def name(self) -> str:
        s = f"{self.kind}{self.n}"
        if self.depth:
            s += f" @ d{self.depth}"
        if self.batch > 1:
            s += f" b{self.batch}"
        return s

    def tokens(self) -> int:
        """Tokens processed in the timed part."""
        return self.n * self.batch

    def capacity(self, tg_prompt: int) -> int:
        """Cache tokens per sequence the test needs."""
        return self.depth + self.n if self.kind == "pp" else (self.depth or tg_prompt) + self.n


def plan_tests(n_prompt: list[int], n_gen: list[int], depths: list[int], batches: list[int],
               ubatches: list[int] | None = None) -> list[TestSpec]:
    """The cartesian product of the lists (pp tests first), llama-bench's order; ``ubatches``
    default: the engine's default chunk."""
    ubs = ubatches or [DEFAULT_PREFILL_CHUNK]
    tests = [TestSpec("pp", p, d, 1, u) for p in n_prompt for d in depths for u in ubs]
    tests += [TestSpec("tg", n, d, b, u) for n in n_gen for d in depths for b in batches for u in ubs]
    return tests


# ============================================================================ run
def _fmt_count(n: float) -> str:
    for unit, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= v:
            return f"{n / v:.2f} {unit}"
    return str(int(n))


def _stats(tps: list[float]) -> dict[str, float]:
    med = statistics.median(tps)
    return {"mean": statistics.fmean(tps), "stddev": statistics.stdev(tps) if len(tps) > 1 else 0.0,
            "median": med, "min": min(tps), "max": max(tps),
            "spread": (max(tps) - min(tps)) / med if med > 0 else 0.0}


class _Runner:
    """Runs the tests on one engine with seeded random token ids."""

    def __init__(self, engine: Any, vocab: int, seed: int, tg_prompt: int):
        import torch

        self.engine, self.vocab, self.tg_prompt = engine, vocab, tg_prompt
        self.gen = torch.Generator().manual_seed(seed)
        self.meter = None  # over ranks: a CommMeter started / stopped around each timed part

    def _ids(self, n: int) -> list[int]:
        import torch

        return torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()

    def run(self, t: TestSpec) -> tuple[float, float]:
        """One run of test ``t`` on fresh sequences: (timed seconds, untimed setup seconds)."""
        eng, ub = self.engine, t.ubatch
        sids = [eng.add_sequence() for _ in range(t.batch)]
        try:
            t0 = time.perf_counter()
            if t.kind == "pp":
                if t.depth:
                    eng.step(sids, [self._ids(t.depth)], logits_rows="last", chunk_tokens=ub)
                prompt = [self._ids(t.n)]
                t1 = self._start()
                eng.step(sids, prompt, logits_rows="last", chunk_tokens=ub)
                return self._stop(t1), t1 - t0
            eng.step(sids, [self._ids(t.depth or self.tg_prompt) for _ in sids], logits_rows="last", chunk_tokens=ub)
            toks = [[[x] for x in self._ids(t.batch)] for _ in range(t.n)]
            t1 = self._start()
            decode_steps(eng, sids, toks)  # pipeline stages: sequence groups in flight together
            return self._stop(t1), t1 - t0
        finally:
            for s in sids:
                eng.release(s)

    def _start(self) -> float:
        if self.meter is not None:
            self.meter.start()
        return time.perf_counter()

    def _stop(self, t1: float) -> float:
        dt = time.perf_counter() - t1
        if self.meter is not None:
            self.meter.stop()
        return dt


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the model-level benchmark; 0 on success, 2 for bad arguments / checkpoint, 3 when
    the memory is too small (a test that fails at run time is reported with exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    # ---------------------------------------------------------------- validation (before loading)
    if args.checkpoint is None:
        return _err("the model-level benchmark needs a checkpoint: --checkpoint DIR (or -m DIR); write a "
                    "random one with 'python -m llm_kernels make-checkpoint --preset NAME --out DIR'")
    if not args.checkpoint.is_dir():
        return _err(f"checkpoint directory {args.checkpoint} does not exist")
    if args.repetitions < 1:
        return _err(f"-r/--repetitions must be >= 1, got {args.repetitions}")
    if args.warmup < 0:
        return _err(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        return _err(f"-t/--threads must be >= 1, got {args.threads}")
    if args.tg_prompt < 1:
        return _err(f"--tg-prompt must be >= 1, got {args.tg_prompt}")
    if args.bandwidth is not None and args.bandwidth <= 0:
        return _err(f"--bandwidth must be > 0, got {args.bandwidth}")
    n_prompt, n_gen = args.n_prompt, args.n_gen
    if n_prompt is None and n_gen is None:
        n_prompt, n_gen = [512], [128]
    tests = plan_tests(n_prompt or [], n_gen or [], args.n_depth, args.batch_size, args.ubatch_size)
    from .. import models
    from ..errors import ConfigError

    try:
        cfg0 = models.load_config(args.checkpoint)
    except ConfigError as e:
        return _err(str(e))
    need = max(t.capacity(args.tg_prompt) for t in tests)
    cap = args.ctx_size if args.ctx_size is not None else need
    limit = int(getattr(cfg0, "max_position_embeddings", cap))
    if cap < 1:
        return _err(f"-c/--ctx-size must be >= 1, got {cap}")
    if need > cap:
        worst = max(tests, key=lambda t: t.capacity(args.tg_prompt))
        return _err(f"test {worst.name} needs {need} cache tokens per sequence (depth + tokens), more than the "
                    f"cache holds (-c/--ctx-size {cap})")
    if cap > limit:
        return _err(f"the tests need {cap} cache tokens per sequence (depth + tokens), more than the model's "
                    f"max_position_embeddings {limit}")
    import numba
    import torch

    from .model_ranks import rank_entry, run_ranks

    where = rank_entry(args, argv)
    if isinstance(where, int):  # the local ranks ran (--nproc N): their exit code
        return where
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ValueError as e:
            return _err(f"-t/--threads: {e}")
    if where is None:
        return _bench(args, argv, tests, cap, cfg0, None)
    settings = {"tests": [(t.name, t.ubatch) for t in tests], "cap": cap}
    return run_ranks(args, where, settings, lambda ctx: _bench(args, argv, tests, cap, cfg0, ctx))


def _bench(args, argv: list[str], tests: list[TestSpec], cap: int, cfg0, ctx) -> int:
    """The benchmark after the argument checks: in one process (``ctx`` None) or as one
    rank (``ctx``: its :class:`~llm_kernels.distributed.runner.RankContext`; errors raise
    instead of returning 2 so that every rank stops; see :mod:`.model_ranks`)."""
    import torch

    from .. import models
    from ..errors import CheckpointError, ConfigError
    from ..kernels.common import jit
    from ..numerics.group_quant import GroupQuantWeight
    from ..numerics.mxfp4 import MXFP4Weight
    from ..numerics.quant import QuantWeight

    quiet = args.quiet

    def log(*a: Any) -> None:
        if not quiet:
            print(*a, file=sys.stderr, flush=True)

    dinfo = jit.dispatch_info()
    cache_files_before = jit.cached_kernel_count()
    spec = models.spec_for_config(cfg0)
    load_before = loadavg()
    t_start = time.perf_counter()
    if load_before is not None and load_before > 0.5:
        log(f"warning: 1-minute load average is {load_before:.2f} before the run: other processes compete for "
            "the cores and the timings will be noisy")

    # ---------------------------------------------------------------- load + engine
    from ..checkpoint import load_checkpoint
    from ..checkpoint.safetensors_io import checkpoint_quant
    from ..runtime.memory import prompt_release, rss, trim

    dtype = getattr(torch, args.dtype)
    log(f"loading {args.checkpoint} (dtype {args.dtype}, quant {args.quant or 'as stored'}) ...")
    t0 = time.perf_counter()
    prompt_release()  # freed float / raw INT8 copies go back to the OS during load (peak RSS)
    try:
        cfg, weights = ctx.load(args.checkpoint, dtype, args.quant) if ctx is not None else \
            load_checkpoint(args.checkpoint, dtype=dtype, progress=not quiet, quant=args.quant)
    except (CheckpointError, ConfigError, ValueError) as e:
        if ctx is not None:
            raise
        return _err(str(e))
    load_s = time.perf_counter() - t0
    quantized = any(isinstance(w, (QuantWeight, GroupQuantWeight, MXFP4Weight)) for w in weights.values())
    max_batch = max(t.batch for t in tests)
    t0 = time.perf_counter()
    try:
        engine = spec.make_engine(weights, cfg, dtype=dtype, max_seq_len=cap, backend=args.backend, timer=None,
                                  max_batch=max_batch, consume_weights=True, **(ctx.engine_kwargs() if ctx else {}))
        engine = ctx.wrap(engine) if ctx is not None else engine
    except (ValueError, ConfigError) as e:
        if ctx is not None:
            raise
        return _err(str(e))
    build_s = time.perf_counter() - t0
    del weights  # the engine holds the prepared weights
    trim()
    prepared = getattr(engine, "w", None)
    if not isinstance(prepared, dict):
        return _err(f"{type(engine).__name__} has no prepared weight dict (engine.w): cannot count bytes per token")
    rb = read_bytes(ctx, prepared, cfg)  # over ranks: the total, per rank under "per_rank" (.model_ranks)
    per_rank = rb.pop("per_rank", None)  # kept once, in the JSON's ranks block
    stored = checkpoint_quant(args.checkpoint)
    scheme = args.quant if args.quant in ("w8a8", "int8", "int8_g32") else stored
    if stored == "release":  # FP8 -> the INT8 scheme at load, MXFP4 experts kept 4-bit
        scheme = (args.quant if args.quant in ("w8a8", "int8", "int8_g32") else "int8_g32") + "+mxfp4"
    quant_label = (scheme or "W8A8").upper() if quantized else {"bfloat16": "BF16", "float32": "F32"}[args.dtype]
    model_label = f"{spec.model_type} {cfg.num_hidden_layers}L {quant_label}"
    backend_label = args.backend + (f" ({dinfo['path']})" if args.backend == "fused" else "")
    impl = spec.backend_stages(args.backend)
    th_torch, th_numba = torch.get_num_threads(), thread_info()["numba_threads"]
    threads_label = str(th_torch) if th_torch == th_numba else f"{th_torch}/{th_numba}"
    m0 = rss()
    log(f"model: {cfg.summary()}; load {load_s:.1f} s, engine build (prepare_weights) {build_s:.1f} s; "
        f"RSS {fmt_bytes(m0['rss'])}, peak so far {fmt_bytes(m0['peak'])}")
    log(f"CPU tier: {dinfo['tier']}; torch threads {th_torch}, numba threads {th_numba} "
        f"({dinfo['threading_layer_config']}); Numba cache: {cache_files_before} index files before the run")
    moe = (f"; MoE: shared experts + {rb['experts_per_tok']} of {rb['n_routed_experts']} routed experts per layer"
           if rb["expert_bytes"] else "")
    log(f"weights {fmt_bytes(rb['total_storage'])} ({_fmt_count(rb['params'])} params); read per decoded token "
        f"{fmt_bytes(rb['per_token'])}{moe}" + (" (totals over the ranks)" if ctx else ""))

    # ---------------------------------------------------------------- bandwidth (before)
    probe = args.bw_bytes
    root = ctx is None or ctx.is_root  # over ranks: rank 0 alone probes, the others wait (.model_ranks)
    bw_before = bw_after = float(args.bandwidth or 0.0)
    bw_src = "given (--bandwidth)"
    int8_peak = None
    if root and not args.bandwidth:
        bw_before = measure_dram_bandwidth(probe)
        bw_src = f"measured: median of 5 x torch.sum over a {fmt_bytes(probe)} float32 array, before and after"
        log(f"DRAM read bandwidth before the tests: {bw_before:.1f} GB/s")
    if root and quantized and any(t.kind == "pp" for t in tests):
        int8_peak = measure_int8_peak()
        log(f"INT8 GEMM compute peak (L2-resident 1024x2048 weight, 256 tokens, this tier): {int8_peak:.0f} GOP/s")
    if ctx is not None:
        ctx.group.meet("wait for rank 0's DRAM probe")  # no collective timeout while rank 0 probes
        ctx.group.barrier("start the tests together")

    # ---------------------------------------------------------------- tests
    runner = _Runner(engine, cfg.vocab_size, args.seed, args.tg_prompt)
    if ctx is not None:
        from ..distributed.commands import CommMeter, gather_json

        runner.meter = CommMeter(ctx)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    first_call = None
    with torch.inference_mode():
        for ti, t in enumerate(tests):
            label = f"[{ti + 1}/{len(tests)} {t.name}]"
            try:
                warm, setups = [], []
                for w in range(args.warmup):
                    s, setup = runner.run(t)
                    warm.append(s)
                    log(f"{label} warm-up {w + 1}/{args.warmup}: {s:.3f} s (+{setup:.1f} s untimed setup)")
                if runner.meter is not None:
                    runner.meter.take()  # the warm-ups' communication is not reported
                runs = []
                for r in range(args.repetitions):
                    s, setup = runner.run(t)
                    runs.append(s)
                    setups.append(setup)
                    log(f"{label} rep {r + 1}/{args.repetitions}: {t.tokens() / s:.2f} t/s ({s:.3f} s"
                        + (f", +{setup:.1f} s untimed setup)" if setup >= 0.05 else ")"))
            except Exception as e:  # noqa: BLE001
                if ctx is not None:  # the ranks would fall out of step: stop every rank
                    raise
                errors.append(f"{t.name}: {type(e).__name__}: {e}")
                log(f"{label} failed: {type(e).__name__}: {e}")
                continue
            tps = [t.tokens() / s for s in runs]
            row = {"test": t.name, "kind": t.kind, "n": t.n, "depth": t.depth, "batch": t.batch,
                   "n_ubatch": t.ubatch, "tokens": t.tokens(), "runs_s": runs, "warmup_s": warm, "setup_s": setups,
                   "t_s": tps, **{
                       f"t_s_{k}": v for k, v in _stats(tps).items()},
                   "median_s": statistics.median(runs)}
            if runner.meter is not None:
                from .model_ranks import comm_row

                row["comm"] = comm_row(runner.meter.take(), args.repetitions, runs)
            if warm:
                row["first_call_extra_s"] = warm[0] - row["median_s"]
                if first_call is None:
                    first_call = (t.name, warm[0], row["median_s"])
            if t.kind == "tg":
                row["weight_bytes_per_step"] = bytes_per_step(rb, t.batch)
                row["steps_per_s_median"] = row["t_s_median"] / t.batch  # the median t/s column, per sequence
            results.append(row)

    # ---------------------------------------------------------------- bandwidth (after), roofline
    if ctx is not None:
        memory = gather_json(ctx, ctx.memory_line(prepared), "gathering the memory lines")
    if root and not args.bandwidth:
        bw_after = measure_dram_bandwidth(probe)
        log(f"DRAM read bandwidth after the tests: {bw_after:.1f} GB/s")
    if ctx is not None:
        ctx.group.meet("wait for rank 0's DRAM probe after the tests")
        if not root:
            return 0  # rank 0 reports
    bw = (bw_before + bw_after) / 2
    for row in results:
        if row["kind"] == "tg":
            row["effective_gbs"] = row["weight_bytes_per_step"] * row["steps_per_s_median"] / 1e9
            row["pct_roofline"] = 100.0 * row["effective_gbs"] / bw
        else:
            row["effective_gbs"] = row["pct_roofline"] = None
            if int8_peak is not None:  # ~ INT8 MACs per token = weight bytes per token (INT8 weights)
                row["gops"] = 2.0 * rb["per_token"] * row["t_s_median"] / 1e9
                row["pct_int8_peak"] = 100.0 * row["gops"] / int8_peak

    # ---------------------------------------------------------------- table
    size, params = fmt_bytes(rb["total_storage"]), _fmt_count(rb["params"])
    headers = ["model", "size", "params", "backend", "threads", "n_ubatch", "test", "t/s", "median t/s", "spread",
               "B/step", "% roofline"]
    if ctx is not None:  # ranks = pipeline stages x expert shards; comm = rank 0's share of a run
        headers[5:5] = ["ranks"]
        headers.append("comm")
    body = []
    for row in results:
        body.append([model_label, size, params, backend_label, threads_label, str(row["n_ubatch"] or "whole"),
                     row["test"],
                     f"{row['t_s_mean']:.2f} ± {row['t_s_stddev']:.2f}", f"{row['t_s_median']:.2f}",
                     f"{100 * row['t_s_spread']:.1f}%",
                     fmt_bytes(row["weight_bytes_per_step"]) if row["kind"] == "tg" else "-",
                     f"{row['pct_roofline']:.1f}%" if row["pct_roofline"] is not None else "-"])
        if ctx is not None:
            body[-1][5:5] = [f"{ctx.world_size}={ctx.layout.pp}x{ctx.layout.ep}"]
            body[-1].append(f"{100 * row['comm']['share']:.1f}%")
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    right = {"size", "params", "threads", "ranks", "n_ubatch", "t/s", "median t/s", "spread", "B/step", "% roofline",
             "comm"}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if h in right else c.ljust(w)
                                 for c, w, h in zip(cells, widths, headers)) + " |"

    print(line(headers))
    print("| " + " | ".join(("-" * (w - 1) + ":") if h in right else "-" * w
                            for w, h in zip(widths, headers)) + " |")
    for r in body:
        print(line(r))
    print()
    print(f"CPU tier: {dinfo['tier']}; torch threads {th_torch}, numba threads {th_numba}")
    if ctx is not None:
        from .model_ranks import ranks_report

        rank_lines, ranks_block = ranks_report(ctx, th_torch, per_rank, memory, results)
        print("\n".join(rank_lines))
    bw_line = (f"DRAM read bandwidth: before {bw_before:.1f} GB/s, after {bw_after:.1f} GB/s, roofline uses the "
               f"mean {bw:.1f} GB/s" if not args.bandwidth else f"DRAM read bandwidth: {bw:.1f} GB/s (given)")
    print(bw_line)
    if int8_peak is not None:
        for row in results:
            if row.get("pct_int8_peak") is not None:
                print(f"{row['test']}: ~{row['gops']:.0f} GOP/s (2 x weight bytes per token x median t/s) = "
                      f"{row['pct_int8_peak']:.1f}% of the INT8 GEMM peak measured in this run, {int8_peak:.0f} GOP/s")
    print(f"weights read per decoded token{' (total over the ranks)' if ctx else ''}: {rb['per_token']:,} B "
          f"({fmt_bytes(rb['per_token'])})"
          + (f"; MoE assumption: shared experts + {rb['experts_per_tok']} routed experts per layer per token, "
             f"b sequences read min(b*{rb['experts_per_tok']}, {rb['n_routed_experts']}) routed experts per step"
             if rb["expert_bytes"] else "") + "; KV cache not counted")
    if first_call is not None:
        name, w0, med = first_call
        total_extra = sum(r.get("first_call_extra_s", 0.0) for r in results)
        print(f"first call (Numba compile or cache load): {name} warm-up {w0:.2f} s vs median {med:.3f} s "
              f"-> {w0 - med:+.2f} s (<= 0: no compile cost visible); warm-ups minus medians, all tests: "
              f"{total_extra:+.2f} s; the Numba cache had {cache_files_before} index files before the run")
    load_after = loadavg()
    la = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in (("before", load_before),
                                                                              ("after", load_after)))
    print(f"load average (1 min): {la}; checkpoint load {load_s:.1f} s, engine build {build_s:.1f} s")
    mem = rss()
    own = rb["total_storage"] if ctx is None else per_rank[0]["total_storage"]
    if mem["peak"] is not None:
        print(f"memory{' (rank 0)' if ctx is not None else ''}: peak RSS {fmt_bytes(mem['peak'])} (load, build and "
              f"tests), RSS at the end {fmt_bytes(mem['rss'])}; resident weights {fmt_bytes(own)} -> peak - weights = "
              f"{fmt_bytes(mem['peak'] - own)}")
    for e in errors:
        print(f"error: {e}")

    out = {"benchmark": "model", "argv": argv, "checkpoint": str(args.checkpoint.resolve()),
           "model_type": spec.model_type, "model": model_label, "model_summary": cfg.summary(),
           "backend": args.backend, "backend_stages": impl, "dtype": args.dtype, "quant": args.quant,
           "weights_quantized": quantized, "size_bytes": rb["total_storage"], "params": rb["params"],
           "bytes_per_token": rb["per_token"], "bytes_breakdown": rb,
           "bytes_rule": ("counted from the engine's prepared weights: tensors at storage size, packed W8A8 "
                          "weights by packed storage (payload + scales + VNNI row sums), embedding (and tid2eid) "
                          "one row per token, MoE: shared experts + num_experts_per_tok routed experts per layer "
                          "(b sequences: min(b*k, E)); KV cache and activations not counted"),
           "cpu_tier": dinfo['tier'], "dispatch": dinfo, "threads": {"torch": th_torch, "numba": th_numba},
           "numba_cache_files_before": cache_files_before,
           "bandwidth_gbs_before": bw_before, "bandwidth_gbs_after": bw_after, "bandwidth_gbs": bw,
           "bandwidth_source": bw_src, "int8_peak_gops": int8_peak, "repetitions": args.repetitions, "warmup": args.warmup,
           "tg_prompt": args.tg_prompt, "n_ubatch": args.ubatch_size, "ctx_size": cap, "load_s": load_s, "engine_build_s": build_s,
           "first_call": ({"test": first_call[0], "warmup_s": first_call[1], "median_s": first_call[2]}
                          if first_call else None),
           "peak_rss_bytes": mem["peak"], "end_rss_bytes": mem["rss"],
           "tests": results, "errors": errors, "loadavg_1m_before": load_before, "loadavg_1m_after": load_after,
           "wall_s": time.perf_counter() - t_start}
    json_path = args.json or Path.cwd() / DEFAULT_JSON
    if ctx is None:
        log(f"wrote {write_results(json_path, out, machine=machine_info(bw, bw_src))}")
    else:  # size / params / bytes: totals over the ranks (.model_ranks); written once every rank finished
        out["ranks"] = ranks_block
        ctx.after_barrier.append(lambda: log(f"wrote {write_results(json_path, out, machine=machine_info(bw, bw_src))}"))
    return 1 if errors else 0
