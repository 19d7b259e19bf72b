"""Command line: ``python -m llm_kernels {generate,logits,make-checkpoint} ...``.

* Every command that takes ``--checkpoint`` reads its ``config.json`` ``model_type`` and
  works through that model's spec (:mod:`llm_kernels.models`); nothing here knows a model.
* ``generate``: text generation (``--prompt``, ``--prompt-ids`` or an interactive ``--chat``)
  with sampling, streaming and stop conditions (:mod:`llm_kernels.cli_generate`); with no
  ``--checkpoint`` it uses the embedded default, the ``mini`` preset written once (seed 0)
  into a cache directory (``$LLM_KERNELS_CACHE`` or ``~/.cache/llm_kernels``). Prints the
  text, the ids, prefill and decode tokens/s and the time per stage.
* ``logits``: writes ``prefill_logits`` / ``decode_logits`` (float32) for conformance checks
  by outside tools. Its options and output format are kept stable.
* ``make-checkpoint``: writes a seeded random HF-format checkpoint of a preset.
* ``quantize``: converts a float (or release) checkpoint to an INT8 format (``--scheme``), or
  a float one to the model's release format (``--format release``).
* Both writers refuse an ``--out`` that is (inside, or holds) the source or is not empty
  (unless ``--force``), write into a hidden sibling folder renamed into place when complete,
  and shard at ``--max-shard-size`` (:mod:`llm_kernels.checkpoint.output_dir`).
* ``bench``: the whole-model benchmark (llama-bench style, ``-p/-n/-d/-b``) or the per-stage
  layer benchmark at real dims (:mod:`llm_kernels.bench`).
* ``golden``: runs the golden harness cases of every registered model (``models/<name>/golden.py``).
* ``profile``: prefill + N decode steps traced per step / layer / stage into a Chrome /
  Perfetto trace-event JSON (``llm_kernels.bench.trace``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

__all__ = ["main", "default_checkpoint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT = "1,2,3,4,5,6,7,8"


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return ids


def default_checkpoint(progress: bool = True) -> Path:
    """Path of the embedded default checkpoint (the default model's ``default_preset``,
    ``mini``, seed 0, bf16), writing it on first use."""
    from .checkpoint.defaults import default_checkpoint as _default

    return _default(progress=progress)


def _load(path: Path | None, dtype: torch.dtype, quant: str | None = None):
    from .runtime.builder import load_model

    return load_model(path, dtype, quant, progress=True)


def _engine(weights, cfg, dtype: torch.dtype, max_seq_len: int, backend: str, timer=None, batch: int = 1,
            prefill_chunk: int | None | str = "default", layers: tuple[int, int] | None = None):
    """The runtime engine of ``cfg``'s model (:func:`llm_kernels.runtime.builder.build_engine`);
    ``prefill_chunk``: rows per step of a chunked prefill ("default": the engine's default);
    ``layers``: one pipeline stage's layers (``RankContext.engine_kwargs``)."""
    from .runtime.builder import build_engine

    kw = {} if layers is None else {"layers": layers}
    if prefill_chunk != "default":
        kw["prefill_chunk"] = prefill_chunk
    return build_engine(weights, cfg, dtype, max_seq_len, backend, timer, batch, **kw)


def _check_ids(ids: list[int], vocab: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SystemExit(f"error: {what} must lie in [0, {vocab}), got {bad[:5]}")


def _set_threads(n: int) -> None:
    """``--threads N``: torch's intra-op threads AND the Numba kernels' threads (N in
    [1, number of CPUs]; SystemExit otherwise)."""
    from .runtime.builder import set_threads

    try:
        set_threads(n)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None


def _setup_run(args: argparse.Namespace):
    """Shared by generate/profile: threads, checkpoint load, prompt validation.
    Returns (dtype, checkpoint path, config, weights, prompt ids)."""
    dtype = _DTYPES[args.dtype]
    if args.threads:
        _set_threads(args.threads)
    ckpt, cfg, weights = _load(args.checkpoint, dtype, args.quant)
    prompt = args.prompt_ids
    if not prompt:
        raise SystemExit("error: --prompt-ids is empty")
    _check_ids(prompt, cfg.vocab_size, "--prompt-ids")
    return dtype, ckpt, cfg, weights, prompt


def _logits_tensors(engine, inputs: list[list[int]], decodes: list[list[int]], vocab: int,
                    step_seconds: list[float] | None = None) -> dict:
    """Prefill every ``inputs`` sequence, then feed ``decodes`` one id per step; returns the
    output tensors of ``logits`` (``prefill_logits[.b]`` / ``decode_logits[.b]``, float32).
    ``step_seconds`` collects each decode step's wall time when given."""
    import time

    from tqdm import tqdm

    sids, prefill = engine.prefill(inputs)
    dec: list[list[torch.Tensor]] = [[] for _ in inputs]
    steps = max(len(d) for d in decodes)
    for i in tqdm(range(steps), desc="decode", unit="step", disable=None if steps else True):  # None: off unless a TTY
        live = [b for b in range(len(inputs)) if i < len(decodes[b])]
        t0 = time.perf_counter()
        outs = engine.decode([sids[b] for b in live], [decodes[b][i] for b in live])
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - t0)
        for b, o in zip(live, outs):
            dec[b].append(o)
    tensors = {}
    for b in range(len(inputs)):
        suffix = "" if len(inputs) == 1 else f".{b}"
        tensors["prefill_logits" + suffix] = prefill[b].float().contiguous()
        tensors["decode_logits" + suffix] = (torch.cat(dec[b]) if dec[b] else
                                             torch.zeros(0, vocab)).float().contiguous()
    return tensors


def _save_logits(tensors: dict, out: Path, dtype_name: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", "dtype": dtype_name, **(extra or {})})


def cmd_logits(args: argparse.Namespace) -> int:
    dtype = _DTYPES[args.dtype]
    inputs: list[list[int]] = args.input_ids
    decodes: list[list[int]] = args.decode_ids or []
    if any(len(x) == 0 for x in inputs):
        raise SystemExit("error: every --input-ids needs at least one id")
    if decodes and len(decodes) != len(inputs):
        raise SystemExit(f"error: {len(inputs)} --input-ids but {len(decodes)} --decode-ids; give one "
                         "--decode-ids per --input-ids (or none)")
    decodes = decodes or [[] for _ in inputs]
    from .cli_ranks import rank_entry

    where = rank_entry(args)
    if isinstance(where, int):  # the local ranks ran (--nproc N): their exit code
        return where
    if where is not None:  # this process is one rank
        return _logits_ranks(args, dtype, inputs, decodes, *where)
    if args.threads:
        _set_threads(args.threads)
    _, cfg, weights = _load(args.checkpoint, dtype, args.quant)
    for x in inputs:
        _check_ids(x, cfg.vocab_size, "--input-ids")
    for x in decodes:
        _check_ids(x, cfg.vocab_size, "--decode-ids")
    max_len = max(len(a) + len(b) for a, b in zip(inputs, decodes))
    engine = _engine(weights, cfg, dtype, max_len, args.backend, batch=len(inputs), prefill_chunk=args.prefill_chunk)
    del weights  # the engine holds the prepared weights
    tensors = _logits_tensors(engine, inputs, decodes, cfg.vocab_size)
    _save_logits(tensors, args.out, args.dtype)
    for k, v in tensors.items():
        print(f"{k}: {list(v.shape)}")
    print(f"wrote {args.out}")
    return 0


def _logits_ranks(args: argparse.Namespace, dtype: torch.dtype, inputs, decodes, rank: int, world: int) -> int:
    """``logits`` as one rank of a group (:mod:`llm_kernels.distributed`): layers split over
    ``--pp`` pipeline stages, each stage's routed experts sharded over its ranks, the rest
    replicated; rank 0 writes ``--out`` once every rank finished (written beside it, renamed
    into place after the final barrier)."""
    import os

    from .cli_ranks import check_layout
    from .distributed.runner import default_threads, run_rank

    layout = check_layout(args.checkpoint, world, args.pp, rank)  # before the rendezvous
    threads = args.threads or default_threads()
    _set_threads(threads)
    settings = dict(command="logits", world=world, pp=layout.pp, dtype=args.dtype, quant=args.quant, backend=args.backend,
                    inputs=inputs, decodes=decodes, threads=threads, prefill_chunk=args.prefill_chunk)

    def body(ctx) -> int:
        cfg, weights = ctx.load(args.checkpoint, dtype, args.quant)
        for x in inputs:
            _check_ids(x, cfg.vocab_size, "--input-ids")
        for x in decodes:
            _check_ids(x, cfg.vocab_size, "--decode-ids")
        max_len = max(len(a) + len(b) for a, b in zip(inputs, decodes))
        engine = ctx.wrap(_engine(weights, cfg, dtype, max_len, args.backend, batch=len(inputs),
                                  prefill_chunk=args.prefill_chunk, **ctx.engine_kwargs()))
        print(ctx.memory_line(engine.w), file=sys.stderr, flush=True)
        del weights
        step_seconds: list[float] = []
        tensors = _logits_tensors(engine, inputs, decodes, cfg.vocab_size, step_seconds)
        if ctx.is_root:
            tmp = args.out.with_name(f".{args.out.name}.partial")
            _save_logits(tensors, tmp, args.dtype, {"ranks": str(world)})
            ctx.after_barrier.append(lambda: os.replace(tmp, args.out))
            print(f"{threads} thread(s) per rank; " + ctx.comm_summary(step_seconds), flush=True)
            for k, v in tensors.items():
                print(f"{k}: {list(v.shape)}")
            ctx.after_barrier.append(lambda: print(f"wrote {args.out}", flush=True))
        return 0

    return run_rank(body, rank=rank, world_size=world, timeout=args.ep_timeout, settings=settings,
                    checkpoint=args.checkpoint, layout=layout)


def _shard_size(text: str) -> int | None:
    """``--max-shard-size``: ``5GB``, ``500MB``, ``2GiB``, bytes, or ``none`` (one file)."""
    from .checkpoint.shards import parse_size

    if text.strip().lower() == "none":
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _writer_args(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--force`` and ``--max-shard-size`` of the checkpoint writers."""
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: new or empty (see --force); written in a hidden sibling folder and "
                        "renamed into place when complete")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (only once the new checkpoint is complete)")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="data bytes per safetensors shard, e.g. 5GB (default), 500MB, 2GiB, or 'none'; "
                        "one model.safetensors when everything fits, else numbered shards + index")


@contextlib.contextmanager
def _writing(out: Path):
    """An OSError while a checkpoint writer runs (disk full, no permission) becomes a clear
    error naming ``--out`` (exit code 2); the writer has already removed its staging folder."""
    try:
        yield
    except OSError as e:
        print(f"error: writing --out {out} failed: {e}; {out} was left as it was", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint.writer import quantize_checkpoint

    if args.format == "release" and args.scheme is not None:
        raise SystemExit("error: --scheme applies to --format int8; --format release has its own (FP8 + MXFP4)")
    with _writing(args.out):
        out = quantize_checkpoint(args.checkpoint, args.out, progress=True, scheme=args.scheme, force=args.force,
                                  shard_size_bytes=args.max_shard_size, format=args.format)
    what = "release-format" if args.format == "release" else (args.scheme or "w8a8")
    print(f"wrote {what} checkpoint {out}")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import write_random_checkpoint
    from .models import preset

    cfg = preset(args.preset, num_hidden_layers=args.layers, n_routed_experts=args.experts,
                 mtp_layers=args.mtp_layers)
    with _writing(args.out):
        out = write_random_checkpoint(cfg, args.out, seed=args.seed, dtype=_DTYPES[args.dtype],
                                      weight_scale=args.weight_scale, progress=True, force=args.force,
                                      shard_size_bytes=args.max_shard_size, format=args.format)
    print(f"{cfg.summary()}\nwrote {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from . import models
    from .bench.trace import (
        build_trace,
        measure_disabled_overhead,
        roofline_quant,
        step_summaries,
        validate_trace,
    )
    from .runtime.timing import StageTimer

    if args.checkpoint is not None and args.preset is not None:
        raise SystemExit("error: give --checkpoint or --preset, not both")
    if args.preset is not None:  # the preset's embedded random checkpoint, written once
        from .checkpoint.defaults import default_checkpoint as preset_checkpoint

        args.checkpoint = preset_checkpoint(args.preset)
    if args.steps < 0:
        raise SystemExit("error: --steps must be >= 0")
    dtype, ckpt, cfg, weights, prompt = _setup_run(args)
    spec = models.spec_for_config(cfg)
    if "trace_roofline" not in spec.extras:
        raise SystemExit(f"error: profile needs a roofline byte model, which model_type {spec.model_type!r} "
                         "does not have yet; use 'generate' for its per-stage times")
    from .checkpoint.safetensors_io import checkpoint_quant

    quant = roofline_quant(args.quant, checkpoint_quant(ckpt))
    bw = args.bandwidth
    if bw is None:
        from .bench.core import measure_dram_bandwidth

        bw = measure_dram_bandwidth(256 * 2 ** 20, repeats=3)
    timer = StageTimer(trace=True)
    extra = 2 * args.overhead_steps * args.overhead_rounds
    engine = _engine(weights, cfg, dtype, len(prompt) + args.steps + extra + 1, args.backend, timer)
    del weights  # the engine holds the prepared weights
    print(f"checkpoint: {ckpt}\nmodel: {cfg.summary()}\ndtype: {args.dtype}, quant: {args.quant} "
          f"(roofline: {quant}), backend: {args.backend}, threads: {torch.get_num_threads()}, "
          f"DRAM bandwidth: {bw:.1f} GB/s{' (given)' if args.bandwidth else ' (measured)'}")
    with timer.scope("prefill", "step", T=len(prompt), L=0, rows_per_seq=len(prompt)):
        (sid,), (logits,) = engine.prefill([prompt])
    nxt = int(logits[-1].argmax())
    L = len(prompt)
    for i in range(args.steps):
        with timer.scope(f"decode {i}", "step", T=1, L=L, rows_per_seq=1):
            (lg,) = engine.decode([sid], [nxt])
        nxt = int(lg[-1].argmax())
        L += 1
    events = list(timer.events)
    overhead = None
    if args.overhead_steps:
        overhead = measure_disabled_overhead(engine, sid, nxt, steps=args.overhead_steps,
                                             rounds=args.overhead_rounds)
    meta = {"checkpoint": str(ckpt), "model": cfg.summary(), "dtype": args.dtype, "quant": args.quant,
            "backend": args.backend, "prompt_ids": prompt, "steps": args.steps,
            "disabled_timer_overhead": overhead}
    trace = build_trace(events, cfg=cfg, quant=quant, bandwidth_gbs=bw, metadata=meta)
    validate_trace(trace)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(trace))
    rows = step_summaries(trace)
    ok = True
    print(f"wrote {args.out} ({len(trace['traceEvents'])} events; open in https://ui.perfetto.dev)")
    print("step coverage (leaf stage slices / step wall time; the rest is driver overhead = other):")
    for r in rows:
        good = abs(1 - r["coverage"]) <= 0.05
        ok &= good
        print(f"  {r['name']:10s} {r['ms']:9.3f} ms  stages {r['leaf_ms']:9.3f} ms  "
              f"{r['coverage']:6.1%}  other {r['other']:6.1%}  {'ok' if good else 'OUTSIDE 5%'}")
    one = rows[-1]
    print(f"one-step summary ({one['name']}, T={one['args'].get('T')}, L={one['args'].get('L')}):")
    print(f"  {'stage':14s} {'ms':>9s} {'% step':>7s}")
    for stage, ms in sorted(one["stages_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:14s} {ms:9.3f} {ms / one['ms']:7.1%}")
    print(f"  {'other':14s} {one['ms'] - one['leaf_ms']:9.3f} {one['other']:7.1%}")
    print(f"  {'step':14s} {one['ms']:9.3f} {1:7.1%}")
    if overhead:
        print(f"disabled-timer overhead: paired A/B over {args.overhead_rounds}x{args.overhead_steps} decode "
              f"steps: disabled {overhead['disabled_ms']:.3f} ms/step vs no-op timer {overhead['noop_ms']:.3f} "
              f"ms/step, median rel diff {overhead['ab_rel_median']:+.2%} (range "
              f"{overhead['ab_rel_min']:+.2%}..{overhead['ab_rel_max']:+.2%}); micro: "
              f"{overhead['per_call_ns']:.0f} ns/call x {overhead['calls_per_step']} calls/step = "
              f"{overhead['est_overhead_rel']:.3%} of a step")
    if not ok:
        print("warning: stage slices do not cover a step to within 5%", file=sys.stderr)
    return 0


def _backend_args(p: argparse.ArgumentParser, default_backend: str = "reference") -> None:
    p.add_argument("--backend", choices=["reference", "fused"], default=default_backend,
                   help=f"stage implementations: fused kernels or the torch reference (default {default_backend})")
    p.add_argument("--quant", choices=["none", "w8a8", "int8", "int8_g32"], default=None,
                   help="weights: none = float; w8a8 = the spec's INT8 set (experts, wq_b, wo_b); int8 = "
                        "every 2-D weight but the embedding and router INT8 (head included, per-row scales); "
                        "int8_g32 = the int8 set with one scale per 32 inputs (Q8_0's granularity, the most "
                        "accurate); quantized on load from a float checkpoint; default: as stored")


def _bench_main(argv: list[str]) -> int:
    """``python -m llm_kernels bench ...`` -> :func:`llm_kernels.bench.driver.main` (the model
    comes from ``--preset`` / ``--checkpoint`` through the registry: ``llm_kernels.bench.adapters`` by ``model_type``)."""
    from .bench.driver import main as bench_main

    return int(bench_main(argv) or 0)


def _golden_main(argv: list[str]) -> int:
    """``golden``: the cases of every registered model (``models/<name>/golden.py``; ``-k
    qwen3`` selects by name). Checkpoints: the embedded defaults, or the model's environment
    variable (``$LLM_KERNELS_GOLDEN_CHECKPOINT``, ``$LLM_KERNELS_GOLDEN_QWEN3_CHECKPOINT``)."""
    from . import models
    from .harness.runner import main as run_main

    cases = []
    for mt in models.model_types():
        cases += models.get(mt).golden_cases()
    return run_main(cases, argv)


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: the OpenAI-compatible server with continuous batching (:mod:`llm_kernels.serve`)."""
    from .serve.launch import serve_main

    return serve_main(args)


def _bench_serve_main(argv: list[str]) -> int:
    """``bench-serve``: concurrent streaming clients against a running server (:mod:`llm_kernels.bench.serve`)."""
    from .bench.serve import main as bench_serve_main

    return int(bench_serve_main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm_kernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    from .cli_generate import add_generate_parser, add_prefill_chunk_arg

    add_generate_parser(sub, _ids, _backend_args)

    lg = sub.add_parser("logits", help="write prefill/decode logits to a safetensors file")
    lg.add_argument("--checkpoint", type=Path, required=True)
    lg.add_argument("--input-ids", type=_ids, action="append", required=True,
                    help="prompt ids; repeat for a batch")
    lg.add_argument("--decode-ids", type=_ids, action="append", default=None,
                    help="ids fed one per decode step; repeat once per --input-ids")
    lg.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    lg.add_argument("--out", type=Path, required=True)
    lg.add_argument("--threads", type=int, default=0,
                    help="torch and kernel threads per process (0: torch's default; with --nproc: CPUs / ranks)")
    from .cli_ranks import add_rank_args

    add_rank_args(lg, "logits")
    add_prefill_chunk_arg(lg)
    _backend_args(lg)
    lg.set_defaults(func=cmd_logits)

    qz = sub.add_parser("quantize", help="convert a float (or release) checkpoint to an INT8 format, or a float one "
                        "to the release format")
    qz.add_argument("--checkpoint", type=Path, required=True, help="source checkpoint folder (float or release)")
    qz.add_argument("--format", choices=["int8", "release"], default="int8",
                    help="int8: this project's INT8 formats (--scheme; default); release: the model's official "
                         "release format (DeepSeek-V4 FP8 + MXFP4 experts, Qwen3 FP8)")
    qz.add_argument("--scheme", choices=["w8a8", "int8", "int8_g32"], default=None,
                    help="with --format int8: w8a8 (default): the spec's INT8 set; int8: every 2-D weight but the "
                         "embedding and router; int8_g32: the int8 set with one scale per 32 inputs")
    _writer_args(qz)
    qz.set_defaults(func=cmd_quantize)

    mk = sub.add_parser("make-checkpoint", help="write a seeded random checkpoint of a preset")
    mk.add_argument("--preset", required=True,
                    help="a registered preset (mini, flash, pro, qwen3-mini, qwen3-32b, ...)")
    mk.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    mk.add_argument("--experts", type=int, default=None, help="number of routed experts")
    mk.add_argument("--mtp-layers", type=int, default=None,
                    help="multi-token-prediction blocks (DeepSeek-V4 mtp.*; the releases have 1; default 0)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    mk.add_argument("--weight-scale", type=float, default=1.0)
    mk.add_argument("--format", choices=["float", "release"], default="float",
                    help="float (default): --dtype everywhere; release: the model's official release format "
                         "(DeepSeek-V4 FP8 + MXFP4 experts, Qwen3 FP8), encoded from the --dtype weights")
    _writer_args(mk)
    mk.set_defaults(func=cmd_make_checkpoint)
    pf = sub.add_parser("profile", help="trace prefill + N decode steps into a Chrome/Perfetto JSON")
    pf.add_argument("--checkpoint", type=Path, default=None,
                    help="HF checkpoint directory (default: the embedded mini checkpoint)")
    pf.add_argument("--preset", default=None,
                    help="a registered preset's random checkpoint (written once into the cache directory)")
    pf.add_argument("--prompt-ids", type=_ids, default=_ids(DEFAULT_PROMPT), help="comma-separated ids")
    pf.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    pf.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    pf.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: all CPUs)")
    pf.add_argument("--bandwidth", type=float, default=None,
                    help="DRAM bandwidth in GB/s for %% of roofline (default: measured, 256 MiB)")
    pf.add_argument("--overhead-steps", type=int, default=0,
                    help="also measure the disabled-timer overhead: paired A/B over N decode steps per arm")
    pf.add_argument("--overhead-rounds", type=int, default=5)
    pf.add_argument("--out", type=Path, required=True)
    _backend_args(pf)
    pf.set_defaults(func=cmd_profile)
    sub.add_parser("bench", help="benchmarks: whole model llama-bench style (--checkpoint DIR -p 512 -n 128, "
                   "over ranks with --nproc N [--pp K]) or one layer per stage vs its roofline (--preset NAME); "
                   "flags: see 'bench --help'")
    gd = sub.add_parser("golden", help="golden cases: cached runtime vs stateless reference "
                        "(args after 'golden' go to the harness: -k, --save-data, --golden-data, --list)")
    gd.add_argument("harness_args", nargs=argparse.REMAINDER)
    gd.set_defaults(func=lambda a: _golden_main(a.harness_args))
    from .serve.launch import add_serve_args

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (docs/serving.md)")
    add_serve_args(sv)
    _backend_args(sv, default_backend="fused")
    sv.set_defaults(func=cmd_serve)
    sub.add_parser("bench-serve", help="N concurrent streaming clients against a running server: aggregate tok/s, "
                   "time to first token, inter-token latency; flags: see 'bench-serve --help'")
    return p


def _prune_kernel_caches() -> None:
    """Delete the Numba caches of other kernel-source versions (each edit of the kernels
    starts a fresh cache directory; the old ones are never read again) and say so."""
    from .kernels.common.jit import prune_stale_caches

    removed = prune_stale_caches()
    if removed:
        print(f"removed {len(removed)} stale kernel cache(s) of other kernel-source versions", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _prune_kernel_caches()
    if argv[:1] == ["bench"] and any(a.split("=")[0] == "--serve" for a in argv[1:]):  # = bench-serve --url
        return _bench_serve_main(argv[1:])
    if argv[:1] == ["bench"]:  # the bench driver parses its own flags
        return _bench_main(argv[1:])
    if argv[:1] == ["golden"]:  # the harness parses its own flags
        return _golden_main(argv[1:])
    if argv[:1] == ["bench-serve"]:  # the server benchmark parses its own flags
        return _bench_serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.raw_argv = argv  # --nproc re-runs the same command line in each rank
    from .errors import CacheOverflowError, CheckpointError, ConfigError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, CacheOverflowError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
