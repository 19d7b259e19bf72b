"""``python -m llm_kernels bench``: ONE layer-benchmark driver for every registered model.

    python -m llm_kernels bench --preset flash --tokens 1,8 --context 4096
    python -m llm_kernels bench --preset qwen3-32b --batch 1,4,16 --context 4096
    python -m llm_kernels bench --checkpoint DIR ...        (the config of DIR, random weights)
    python -m llm_kernels bench --compare A.json B.json
    python -m llm_kernels bench --from-json A.json --plot A.png
    python -m llm_kernels bench --checkpoint DIR -p 512 -n 128   (model-level mode: :mod:`.model`)

The model comes from ``--preset`` (any registered preset -> its :class:`ModelSpec`) or from
``--checkpoint`` (its ``config.json`` ``model_type``); its adapter is
``adapters.ADAPTERS[spec.model_type]`` (an object with the model-specific flags, layer setup, variants,
tables and byte model, see :class:`Adapter`). This module owns what every model shares:
the common flags, argument checks, backend resolution, the memory check, the DRAM
bandwidth (start / end of the run, and a probe timed round-robin with the variants of every
measurement), warm-up + repeats with paired round-robin rounds (:meth:`BenchContext.measure`),
the result JSON (default ``./bench_<preset>.json`` in the current folder), the plot and the
offline ``--compare`` / ``--from-json`` modes (:mod:`llm_kernels.bench.compare_runs`).
See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .core import (
    BenchResult,
    bytes_arg,
    csv,
    fmt_bytes,
    interleaved,
    ints,
    loadavg,
    machine_info,
    measure_dram_bandwidth,
    mem_available,
    write_results,
)

__all__ = ["main", "build_parser", "BenchContext", "Adapter", "adapter_for", "bench_specs", "select_model", "resolve_backend",
           "csv", "ints", "bytes_arg", "DEFAULT_PRESET", "QUANTS"]

DEFAULT_PRESET = "flash"
PACKAGE_DIR = Path(__file__).resolve().parents[1]   # the llm_kernels package this driver runs from
QUANTS = ("none", "w8a8")     # --quant values; the roofline modes are bf16 / w8a8
ROOFLINE_QUANT = {"none": "bf16", "w8a8": "w8a8"}


class Adapter(Protocol):
    """What a model plugs into the driver (listed in :mod:`.adapters` by ``model_type``).

    name: the JSON ``benchmark`` value (``--from-json`` finds the plotter by it).
    description: one line for ``--help``. defaults: defaults of common flags (``repeats``,
    ``quant``, ...). roofline: the model's byte model module.
    add_arguments(parser): model-specific flags.
    make_config(args, cfg) -> the benchmarked config (raise ValueError / ConfigError).
    validate(args, cfg) -> error message or None.
    variants(ctx) -> [(backend, quant)] to time (may add notes / change ``ctx.backend_status``).
    estimate_bytes(ctx) -> peak memory estimate (without the bandwidth probe).
    run(ctx): builds the layers and calls :meth:`BenchContext.measure` per measurement.
    report(ctx, bw_end) -> dict: prints the tables; the model-specific JSON keys.
    plot(data, path) -> path of the PNG written.
    """

    name: str
    description: str
    defaults: dict


# ============================================================================ arguments
# ============================================================================ model selection
def adapter_for(spec) -> Any | None:
    """The layer-bench adapter serving ``spec``'s model (:data:`.adapters.ADAPTERS`), or None."""
    from .adapters import ADAPTERS

    return ADAPTERS.get(spec.model_type)


def bench_specs() -> list:
    """Registered model specs that have a bench adapter."""
    from .. import models

    return [s for s in (models.get(t) for t in models.model_types()) if adapter_for(s) is not None]


def _bench_presets() -> list[str]:
    return sorted(p for s in bench_specs() for p in s.presets)


def select_model(argv: list[str], default_preset: str):
    """(spec, base config, preset name or None, checkpoint or None) from --preset/--checkpoint;
    raises ValueError with a user message."""
    from .. import models
    from ..errors import ConfigError

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--checkpoint", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None and known.checkpoint is not None:
        raise ValueError("give --preset or --checkpoint, not both")
    try:
        if known.checkpoint is not None:
            cfg = models.load_config(known.checkpoint)
            name = None
        else:
            name = known.preset or default_preset
            cfg = models.preset(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    spec = models.spec_for_config(cfg)
    if adapter_for(spec) is None:
        raise ValueError(f"model_type {spec.model_type!r} has no bench adapter (llm_kernels.bench.adapters); "
                         f"benchmarked presets: {_bench_presets()}")
    return spec, cfg, name, known.checkpoint


def build_parser(adapter=None, default_preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The common flags plus ``adapter``'s (default: the adapter of ``default_preset``)."""
    if adapter is None:
        from .. import models

        adapter = adapter_for(models.spec_for_config(models.preset(default_preset)))
    p = argparse.ArgumentParser(
        prog="python -m llm_kernels bench", description=adapter.description,
        epilog=f"The model comes from --preset or --checkpoint; the model-specific flags shown are those of "
               f"{adapter.name} (--preset {default_preset}); 'bench --preset NAME --help' shows another "
               f"model's. Benchmarked presets: {', '.join(_bench_presets())}. See docs/benchmarks.md.")
    p.add_argument("--preset", default=default_preset, metavar="NAME",
                   help=f"registered preset: its model and dimensions (default {default_preset})")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="use DIR's config.json (model and dimensions; weights stay random) instead of a preset")
    p.add_argument("--context", type=int, default=4096, help="context length L: tokens already in every "
                   "sequence's cache (default 4096)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2; Numba compiles in the first)")
    p.add_argument("--backends", type=csv, default=["reference", "fused"],
                   help="reference and/or fused (default reference,fused)")
    p.add_argument("--quant", type=csv, default=["w8a8"], help="none (bf16 weights) and/or w8a8 (INT8)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the transformers decoder-layer comparison")
    p.add_argument("--json", type=Path, default=None, help="result file (default ./bench_<preset>.json in the "
                   "current folder)")
    p.add_argument("--bandwidth", type=float, default=None, help="DRAM bandwidth in GB/s to use instead of "
                   "measuring it (no probe)")
    p.add_argument("--bw-bytes", type=bytes_arg, default=int(1.5 * 2 ** 30), help="array size of the bandwidth "
                   "measurement and of the probe timed with the variants (default 1.5G)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only the tables")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="also write a PNG of the "
                   "per-stage times and %% of roofline (needs matplotlib: pip install 'llm_kernels[plot]')")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULT.json", help="do not benchmark: "
                   "read this result file (use with --plot)")
    p.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="do not benchmark: paired comparison of two result files (median A, median B, "
                   "B/A, per-run pair ratios); docs/performance.md")
    p.add_argument("--variants", type=csv, default=None, help="with --compare: only these backend/quant "
                   "variants, e.g. fused/w8a8")
    p.add_argument("--no-stages", dest="stages", action="store_false", help="with --compare: layer totals only")
    adapter.add_arguments(p)
    p.set_defaults(**adapter.defaults)
    return p


# ============================================================================ offline modes
def _plotter(data: dict) -> Callable:
    from . import compare_runs as cr

    for spec in bench_specs():
        a = adapter_for(spec)
        if a is not None and a.name == data.get("benchmark"):
            return a.plot
    return cr.plot_results


def _offline(argv: list[str]) -> int | None:
    """--compare / --from-json (no model needed). None when a benchmark should run."""
    from . import compare_runs as cr

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--compare", type=Path, nargs=2, default=None)
    p.add_argument("--from-json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--variants", type=csv, default=None)
    p.add_argument("--no-stages", dest="stages", action="store_false")
    args, _ = p.parse_known_args(argv)
    if args.compare is None and args.from_json is None:
        return None
    try:
        if args.compare is not None:
            a, b = (cr.load_results(x) for x in args.compare)
            cmp = cr.compare_results(a, b, variants=args.variants)
            print(cr.format_comparison(cmp, str(args.compare[0]), str(args.compare[1]), stages=args.stages))
        if args.from_json is not None:
            if args.plot is None:
                print("error: --from-json needs --plot FILE.png", file=sys.stderr)
                return 2
            data = cr.load_results(args.from_json)
            print(f"wrote {_plotter(data)(data, args.plot)}")
        elif args.plot is not None:
            print("error: --plot with --compare needs --from-json (which result to plot)", file=sys.stderr)
            return 2
    except (cr.CompareError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ============================================================================ run context
def resolve_backend(spec, name: str) -> tuple[Any, dict | None, str | None]:
    """(ops, {op: "fused" | "reference"}, None) or (None, None, reason) for backend ``name``."""
    try:
        return spec.stages(name), dict(spec.backend_stages(name)), None
    except Exception as e:  # noqa: BLE001
        return None, None, f"{type(e).__name__}: {e}"


class BenchContext:
    """State of one benchmark run shared by the driver and the adapter: parsed ``args``,
    ``spec``, benchmarked ``cfg``, ``log``, the start bandwidth ``bw``, backends (``ops``:
    name -> ops namespace, ``impl``: name -> {op: impl}, ``backend_status``), ``variants``,
    ``errors`` / ``notes`` and the per-measurement bandwidths ``bw_cells``."""

    def __init__(self, args, spec, cfg, log: Callable[..., None]):
        self.args, self.spec, self.cfg, self.log = args, spec, cfg, log
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.ops: dict[str, Any] = {}
        self.impl: dict[str, dict] = {}
        self.backend_status: dict[str, str] = {}
        self.variants: list[tuple[str, str]] = []
        self.bw = self.bw_end = None
        self.bw_src = ""
        self.bw_cells: dict[Any, float] = {}
        self.probe = None

    def roofline_quant(self, quant: str) -> str:
        return ROOFLINE_QUANT[quant]

    def measure(self, label: str, fns: dict[str, Callable], setups: dict[str, Callable] | None = None,
                cell: Any = None, after_first: Callable[[], Any] | None = None
                ) -> tuple[dict[str, BenchResult], float]:
        """Time the variants ``fns`` of one measurement: each runs once alone first (the first
        warm-up run: compiles, materialises; a failing variant is reported in ``errors`` and
        dropped), then ``--warmup - 1`` untimed and ``--repeats`` timed round-robin rounds
        (:func:`~llm_kernels.bench.core.interleaved`; ``setups`` run untimed before each call)
        together with the DRAM probe (``torch.sum`` over the probe array) unless
        ``--bandwidth`` was given. Returns (timings by variant, GB/s of the probe, else the
        start bandwidth); the bandwidth is also kept in ``bw_cells[cell or label]``.
        ``after_first()`` runs between the first runs and the timed rounds."""
        setups = dict(setups or {})
        fns = dict(fns)
        for key in list(fns):
            try:
                t0 = time.perf_counter()
                if key in setups:
                    setups[key]()
                fns[key]()
                self.log(f"[{label}] {key}: first run {time.perf_counter() - t0:.2f} s")
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"{label} {key}: {type(e).__name__}: {e}")
                self.log(f"  {key} failed: {type(e).__name__}: {e}")
                del fns[key]
        if after_first is not None:
            after_first()
        if not fns:
            return {}, self.bw
        if self.probe is not None:
            fns["dram_probe"] = self.probe.sum
        timed = interleaved(fns, repeats=self.args.repeats, warmup=max(self.args.warmup - 1, 0), setups=setups)
        pr = timed.pop("dram_probe", None)
        bw = self.probe.numel() * 4 / pr.median_s / 1e9 if pr is not None else self.bw
        self.bw_cells[label if cell is None else cell] = bw
        return timed, bw


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# ============================================================================ main
def main(argv: list[str] | None = None, default_preset: str = DEFAULT_PRESET) -> int:
    """Run the benchmark; returns 0, 1 (a variant failed; the rest is reported), 2 (bad
    arguments / nothing to run) or 3 (not enough memory)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import model as _model_bench

    if any(a.split("=", 1)[0] == "--speculative" for a in argv):  # MTP speculative decoding vs plain
        from . import speculative

        return speculative.main(argv)
    if _model_bench.wants_model_mode(argv):  # -p/-n/-d/-b/--model: the model-level (llama-bench) mode
        return _model_bench.main(argv)
    rc = _offline(argv)
    if rc is not None:
        return rc
    try:
        spec, base_cfg, preset_name, ckpt = select_model(argv, default_preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adapter = adapter_for(spec)
    args = build_parser(adapter, preset_name or default_preset).parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    from ..errors import ConfigError

    err = None
    if not args.quant or any(q not in QUANTS for q in args.quant):
        err = f"--quant must be a list of {', '.join(QUANTS)}; got {args.quant}"
    elif args.repeats < 1 or args.warmup < 0 or args.context < 0:
        err = "--repeats >= 1, --warmup >= 0, --context >= 0 required"
    else:
        try:
            cfg = adapter.make_config(args, base_cfg)
            err = adapter.validate(args, cfg)
            if err is None and args.plot is not None:  # fail before a long benchmark, not after it
                from .compare_runs import require_matplotlib
                require_matplotlib()
        except (ConfigError, ValueError, RuntimeError) as e:
            err = str(e)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    label = preset_name or (ckpt.resolve().name if ckpt is not None else "checkpoint")
    json_path = args.json or Path.cwd() / f"bench_{_slug(label)}.json"
    ctx = BenchContext(args, spec, cfg, log)
    ctx.preset = preset_name if preset_name is not None else str(ckpt)
    for b in args.backends:
        ops, impl, why = resolve_backend(spec, b)
        if ops is None:
            ctx.backend_status[b] = f"unavailable: {why}"
        else:
            ctx.ops[b], ctx.impl[b], ctx.backend_status[b] = ops, impl, "ok"
    ctx.variants = adapter.variants(ctx)
    for b, s in ctx.backend_status.items():
        log(f"backend {b}: {s}")
    if not ctx.variants:
        print("error: nothing to run (no usable backend/quant variant)", file=sys.stderr)
        return 2

    est = adapter.estimate_bytes(ctx) + (0 if args.bandwidth else max(args.bw_bytes, 2 ** 26))
    avail = mem_available()
    log(f"{cfg.summary()}; context {args.context}, variants {[f'{b}/{q}' for b, q in ctx.variants]}; "
        f"estimated peak memory {fmt_bytes(est)}" + (f" (available {fmt_bytes(avail)})" if avail else ""))
    if avail is not None and est > 0.9 * avail:
        print(f"error: the benchmark needs about {fmt_bytes(est)} but only {fmt_bytes(avail)} is available",
              file=sys.stderr)
        return 3

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    load_before = loadavg()
    if load_before is not None and load_before > 0.5:
        log(f"warning: 1-minute load average is {load_before:.2f} before the run: other processes compete "
            "for the cores and the timings will be noisy")
    if args.bandwidth:
        ctx.bw, ctx.bw_src = float(args.bandwidth), "given (--bandwidth)"
    else:
        ctx.bw = measure_dram_bandwidth(args.bw_bytes)
        ctx.bw_src = f"measured: median of 5 x torch.sum over a {fmt_bytes(args.bw_bytes)} float32 array"
        # the probe timed round-robin WITH the variants: the bandwidth of the same minutes
        ctx.probe = torch.arange(max(args.bw_bytes, 2 ** 26) // 4, dtype=torch.float32)
    log(f"llm_kernels: {PACKAGE_DIR}")
    log(f"DRAM read bandwidth at the start {ctx.bw:.1f} GB/s ({ctx.bw_src}); torch threads "
        f"{torch.get_num_threads()}")
    with torch.inference_mode():
        adapter.run(ctx)
    ctx.probe = None
    ctx.bw_end = None if args.bandwidth else measure_dram_bandwidth(args.bw_bytes)
    data = adapter.report(ctx, ctx.bw_end)
    log(f"DRAM read bandwidth: start {ctx.bw:.1f} GB/s, end " + (f"{ctx.bw_end:.1f}" if ctx.bw_end else "-")
        + " GB/s; probed with the runs: " + ", ".join(f"{k}: {v:.1f}" for k, v in ctx.bw_cells.items())
        + " GB/s ('% roofline' uses the probe of its measurement)")
    for b, s in ctx.backend_status.items():
        if not s.startswith("ok"):
            print(f"backend {b}: {s}")
    for e in ctx.errors:
        print(f"error: {e}")
    out = {"benchmark": adapter.name, "argv": argv, "preset": ctx.preset, "model_type": spec.model_type,
           "llm_kernels": str(PACKAGE_DIR),
           **data,
           "context": args.context, "quant": args.quant, "variants": [f"{b}/{q}" for b, q in ctx.variants],
           "repeats": args.repeats, "warmup": args.warmup, "bandwidth_gbs": ctx.bw, "bandwidth_source": ctx.bw_src,
           "bandwidth_gbs_end": ctx.bw_end, "bandwidth_gbs_per_cell": ctx.bw_cells,
           "backends": ctx.backend_status, "notes": ctx.notes, "errors": ctx.errors,
           "wall_s": time.perf_counter() - t0, "loadavg_1m_before": load_before, "loadavg_1m_after": loadavg()}
    path = write_results(json_path, out, machine=machine_info(ctx.bw, ctx.bw_src))
    log(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.plot is not None:
        log(f"wrote {adapter.plot(out, args.plot)}")
    return 0 if not ctx.errors else 1
