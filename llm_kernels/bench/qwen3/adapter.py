"""Qwen3 adapter of the layer benchmark (``python -m llm_kernels bench --preset qwen3-32b``).

Seeded random bf16 weights of one decoder layer (``--quant w8a8``: the 7 projections
per-channel INT8). ``B`` sequences already hold ``--context`` tokens: the paged KV cache is
filled with random bf16 K/V ~ N(0, 1), no prefill. Each run reserves one slot per sequence,
runs :meth:`Qwen3Engine.forward_rows` on a random bf16-valued ``x [B, hidden]`` and is
rolled back untimed. Per-stage times from the engine's :class:`StageTimer` (``other`` =
total − Σ stages). Bytes from :mod:`llm_kernels.models.qwen3.roofline`; % roofline at the
DRAM probe the driver times round-robin with the variants of each batch. Baseline and
cross-check: transformers' ``Qwen3DecoderLayer`` on the same tensors with a ``DynamicCache``
and/or ``StaticCache`` (``--hf-cache``). ``reference/w8a8`` is opt-in (``--reference-w8a8``:
a float64 golden, not a speed baseline). A fused backend with no Qwen3 stage fused is
skipped and reported. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ...models.qwen3 import roofline as rq
from ...runtime.qwen3.engine import Qwen3Engine
from ...runtime.qwen3.stages import STAGES
from ...runtime.timing import StageTimer
from ..core import BenchResult, csv, fmt_bytes, ints, print_table
from .layer import KVState, build_hf_layer, build_weights, quantize_layer, seed_of

__all__ = ["ADAPTER", "Qwen3Bench", "STAGE_OPS"]

BF16 = torch.bfloat16
# engine stage -> ops attribute (spec.backend_stages reports ops attributes)
STAGE_OPS = {"input_norm_qkv": "input_norm_qkv", "qk_norm_rope": "qk_norm_rope_cache",
             "attention": "paged_attention", "o_proj_residual_norm": "o_proj_residual_norm",
             "gate_up_swiglu": "gate_up_swiglu", "down_residual": "down_residual"}
DIMS = (("--hidden", "hidden_size"), ("--intermediate", "intermediate_size"), ("--heads", "num_attention_heads"),
        ("--kv-heads", "num_key_value_heads"), ("--head-dim", "head_dim"))


def _stats(vals: list[float]) -> dict[str, float]:
    r = BenchResult.from_runs(vals)
    return {"median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s}


def _compare(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    a, b = ref.double().flatten(), x.double().flatten()
    return {"cosine": (a @ b / (a.norm() * b.norm())).item(), "max_abs_diff": (a - b).abs().max().item(),
            "max_abs_ref": a.abs().max().item()}


def _gbs(nbytes: float, s: float) -> float | None:
    return nbytes / s / 1e9 if s > 0 else None


def _variant_entry(ctx, key, res, runs, B, bw, impl) -> dict[str, Any]:
    """JSON entry of one variant at batch B: per-stage stats (``runs``: the timed runs' StageTimer
    seconds) with bytes, GB/s, % roofline at ``bw`` GB/s; appends the printed rows."""
    cfg, L = ctx.cfg, ctx.args.context
    b, q = key.split("/")
    bd = rq.layer_breakdown(cfg, B, L, ctx.roofline_quant(q))
    stages: dict[str, Any] = {}
    for s in STAGES:
        secs = [r.get(s, 0.0) for r in runs]
        sm, nb = _stats(secs), bd[s].total
        e = stages[s] = {**sm, "runs": secs, "bytes": nb, "weight_bytes": bd[s].weights, "cache_bytes": bd[s].cache,
                         "activation_bytes": bd[s].activations, "gbs": _gbs(nb, sm["median_s"]),
                         "roofline_pct": rq.roofline_pct(nb, sm["median_s"], bw), "impl": impl[s]}
        if s == "attention":
            e["kv_read_bytes"] = rq.kv_read_bytes(cfg, B, L)
            e["kv_roofline_pct"] = rq.roofline_pct(e["kv_read_bytes"], sm["median_s"], bw)
        ctx.stage_rows.append([key, B, s, impl[s], sm["median_s"] * 1e3, fmt_bytes(nb), e["gbs"], e["roofline_pct"],
                               e.get("kv_roofline_pct")])
    other = [t - sum(r.get(s, 0.0) for s in STAGES) for t, r in zip(res.runs, runs)]
    stages["other"] = {**_stats(other), "runs": other}
    ctx.stage_rows.append([key, B, "other", "-", stages["other"]["median_s"] * 1e3, "-", None, None, None])
    lb = sum(v.total for v in bd.values())
    pct = rq.roofline_pct(lb, res.median_s, bw)
    ctx.stage_rows.append([key, B, "LAYER TOTAL", "", res.median_s * 1e3, fmt_bytes(lb), _gbs(lb, res.median_s), pct,
                           None])
    return {"layer_type": "full", "T": B, "batch": B, "sequences": B, "rows_per_seq": 1, "context": L, "backend": b,
            "quant": q, "total": res.to_dict(), "layer_bytes": lb, "gbs": _gbs(lb, res.median_s), "roofline_pct": pct,
            "roofline_s": rq.roofline_seconds(lb, bw), "bandwidth_gbs": bw, "stages": stages}


def _cross_check(entry, key, timed, outs, hf_keys, hf_first, hf_out) -> None:
    """Speed-ups (vs the same-quant reference, reference/none, each transformers cache) and output
    comparisons (vs the first transformers cache, vs reference/none) of one variant, into ``entry``."""
    res, q = timed[key], key.split("/")[1]
    if hf_out is not None:
        entry["vs_transformers"] = _compare(hf_out, outs[key])
        entry["speedup_vs_transformers"] = timed[hf_first].median_s / res.median_s
        entry["transformers_baseline"] = hf_first
        entry["speedup_vs"] = {k: timed[k].median_s / res.median_s for k in hf_keys if k in timed}
    if key != "reference/none" and "reference/none" in timed:
        entry["vs_reference_none"] = _compare(outs["reference/none"], outs[key])
        entry["speedup_vs_reference_none"] = timed["reference/none"].median_s / res.median_s
    if not key.startswith("reference/") and f"reference/{q}" in timed:
        entry["speedup_vs_reference"] = timed[f"reference/{q}"].median_s / res.median_s


class Qwen3Bench:
    """The driver's adapter (see :class:`llm_kernels.bench.driver.Adapter`)."""

    model_type = "qwen3"  # the registry entry it serves (:mod:`llm_kernels.bench.adapters`)
    name = "bench_qwen3_layer"
    description = ("Time one Qwen3 decoder layer's decode step per stage vs its memory roofline and vs "
                   "transformers (docs/benchmarks.md).")
    defaults = {"repeats": 7, "quant": ["none", "w8a8"]}
    roofline = rq

    def add_arguments(self, p) -> None:
        g = p.add_argument_group("Qwen3 (--preset qwen3-32b, qwen3-mini)")
        g.add_argument("--batch", type=ints, default=[1, 4, 16], help="sequences B, one new token each (1,4,16)")
        g.add_argument("--block-size", type=int, default=16, help="KV page size in tokens (default 16)")
        g.add_argument("--reference-w8a8", action="store_true", help="also time reference/w8a8 (float64 golden, "
                       "slow)")
        g.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention (sdpa)")
        g.add_argument("--hf-cache", type=csv, default=["dynamic"], help="transformers cache(s): dynamic "
                       "(DynamicCache, generate()'s default: torch.cat of the whole K/V per step) and/or static "
                       "(StaticCache, in place); speed-ups are vs the first (default dynamic)")
        for flag, field in DIMS:  # dimension overrides (tests)
            g.add_argument(flag, dest=field, type=int, default=None, help=argparse.SUPPRESS)

    def make_config(self, args, cfg):
        over = {k: getattr(args, k) for _, k in DIMS if getattr(args, k) is not None}
        return cfg.replace(num_hidden_layers=1, **over)

    def validate(self, args, cfg) -> str | None:
        if not args.hf_cache or any(c not in ("dynamic", "static") for c in args.hf_cache):
            return f"--hf-cache must be a list of dynamic, static; got {args.hf_cache}"
        if args.block_size < 1:
            return "--block-size >= 1 required"
        if args.context + 1 > cfg.max_position_embeddings:
            return f"--context {args.context} + 1 exceeds max_position_embeddings {cfg.max_position_embeddings}"
        return None

    def variants(self, ctx) -> list[tuple[str, str]]:
        out = []
        for b in list(ctx.ops):
            impl = ctx.impl[b] = {s: ctx.impl[b].get(op, "reference") for s, op in STAGE_OPS.items()}
            if b == "fused" and "fused" not in impl.values():
                ctx.backend_status[b] = "skipped: no Qwen3 stage is fused yet (spec.backend_stages('fused'))"
                continue
            if b == "fused":
                ctx.backend_status[b] = f"ok (fused: {[s for s, v in impl.items() if v == 'fused']})"
            for q in ctx.args.quant:
                if b == "reference" and q == "w8a8" and not ctx.args.reference_w8a8:
                    ctx.notes.append("reference/w8a8 not timed (pass --reference-w8a8): the reference INT8 GEMM runs "
                                     "in float64 and converts every INT8 weight to float64 per call (~1 GB transient "
                                     "for gate/up/down at 32B dims); a golden, not a speed baseline.")
                    continue
                out.append((b, q))
        return out

    def estimate_bytes(self, ctx) -> int:
        cfg, args = ctx.cfg, ctx.args
        kv = 2 * max(args.batch) * (args.context + 1 + args.block_size) * cfg.kv_size * 2   # one paged / dense K+V
        w8 = any(q == "w8a8" for _, q in ctx.variants)
        return (rq.layer_weight_bytes(cfg, "bf16") + rq.layer_weight_bytes(cfg, "w8a8") * w8
                + kv * (2 + len(args.hf_cache) if args.transformers else 1)
                + max(cfg.intermediate_size, cfg.q_size) * cfg.hidden_size * 12)  # float64 / quantise temporaries

    # ------------------------------------------------------------------ run
    def run(self, ctx) -> None:
        args, cfg, log = ctx.args, ctx.cfg, ctx.log
        L = args.context
        t0 = time.perf_counter()
        log(f"batch {args.batch}; building weights ...")
        w_bf16 = build_weights(cfg, args.seed, log)
        weights = {"none": w_bf16}
        if any(q == "w8a8" for _, q in ctx.variants):
            weights["w8a8"] = quantize_layer(w_bf16, log)
        hf = None
        if args.transformers:
            try:
                hf = build_hf_layer(cfg, w_bf16, args.hf_attn)
            except Exception as e:  # noqa: BLE001
                ctx.errors.append(f"transformers layer: {type(e).__name__}: {e}")
                log(f"  transformers layer unavailable: {e}")
        log(f"weights ready ({time.perf_counter() - t0:.1f} s)")
        ctx.results, ctx.hf_results, ctx.stage_rows, ctx.total_rows = [], [], [], []
        for B in args.batch:
            tb = time.perf_counter()
            st = KVState(cfg, B, L, args.block_size, args.seed, hf is not None)
            g = torch.Generator().manual_seed(seed_of(args.seed, "x", B))
            x = torch.randn(B, cfg.hidden_size, generator=g).to(BF16).float()
            log(f"[B={B}] KV cache filled: {fmt_bytes(st.cache.nbytes())} ({time.perf_counter() - tb:.1f} s)")
            fns: dict[str, Callable] = {}
            setups: dict[str, Callable] = {}
            stage_log: dict[str, list[dict[str, float]]] = {}
            outs: dict[str, torch.Tensor] = {}
            for b, q in ctx.variants:
                key = f"{b}/{q}"
                timer = StageTimer(enabled=True)
                eng = Qwen3Engine(weights[q], cfg, dtype=BF16, max_seq_len=L + 1, max_batch=1,
                                  block_size=args.block_size, num_blocks=1, ops=ctx.ops[b], timer=timer, num_layers=1)
                eng.cache = st.cache  # every variant runs on the same filled cache
                runs: list[dict[str, float]] = []

                def fn(eng=eng, timer=timer, runs=runs, key=key, st=st, x=x, B=B, outs=outs):
                    timer.reset()
                    outs[key] = eng.forward_rows(None, st.seq_ids, [L] * B, [1] * B, st.slots, x=x)
                    runs.append(dict(timer.seconds))
                fns[key], setups[key], stage_log[key] = fn, st.reserve, runs
            hf_keys = [f"transformers/{c}" for c in args.hf_cache] if hf is not None else []
            for hkey in hf_keys:
                layer, hcfg, rotary = hf
                dc, restore = st.hf_cache(hcfg, hkey.split("/")[1])
                xh = x.to(BF16).view(B, 1, cfg.hidden_size)
                pos = torch.full((B, 1), L, dtype=torch.long)

                def hf_fn(layer=layer, rotary=rotary, dc=dc, xh=xh, pos=pos, hkey=hkey, outs=outs):
                    pe = rotary(xh, position_ids=pos)
                    outs[hkey] = layer(xh, attention_mask=None, position_ids=pos, cache=dc,
                                       use_cache=True, position_embeddings=pe)
                fns[hkey], setups[hkey] = hf_fn, restore
            timed, bwB = ctx.measure(f"B={B}", fns, setups, cell=B)
            st.reset()
            self._record(ctx, B, timed, bwB, outs, stage_log, hf_keys)
            log(f"[B={B}] " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items())
                + f"; DRAM {bwB:.1f} GB/s ({time.perf_counter() - tb:.1f} s)")
            del st, fns, setups, outs, timed
            gc.collect()

    def _record(self, ctx, B, timed, bwB, outs, stage_log, hf_keys) -> None:
        args, cfg, L = ctx.args, ctx.cfg, ctx.args.context
        hf_first = next((k for k in hf_keys if k in timed), None)   # the speed-up / cross-check baseline
        hf_out = outs[hf_first].float().reshape(B, cfg.hidden_size) if hf_first else None
        ref_out = outs.get("reference/none")
        for key, res in timed.items():
            if not key.startswith("transformers"):
                entry = _variant_entry(ctx, key, res, stage_log[key][-args.repeats:], B, bwB,
                                       ctx.impl[key.split("/")[0]])
                _cross_check(entry, key, timed, outs, hf_keys, hf_first, hf_out)
                ctx.results.append(entry)
                ctx.total_rows.append([key, B, res.median_s * 1e3, fmt_bytes(entry["layer_bytes"]), entry["gbs"],
                                       entry["roofline_pct"], entry.get("speedup_vs_reference"),
                                       entry.get("speedup_vs_reference_none"), entry.get("speedup_vs_transformers"),
                                       f"{entry['vs_transformers']['cosine']:.6f}" if hf_out is not None else "-"])
        for hkey in hf_keys:
            if hkey not in timed:
                continue
            hr, lb = timed[hkey], rq.layer_bytes(cfg, B, L, "bf16")
            hentry = {"batch": B, "context": L, "dtype": "bf16", "attn_implementation": args.hf_attn,
                      "cache": hkey.split("/")[1], "total": hr.to_dict(), "layer_bytes": lb,
                      "gbs": _gbs(lb, hr.median_s), "roofline_pct": rq.roofline_pct(lb, hr.median_s, bwB),
                      "bandwidth_gbs": bwB}
            if ref_out is not None:
                hentry["vs_reference_none"] = _compare(ref_out, outs[hkey].float().reshape(B, cfg.hidden_size))
            ctx.hf_results.append(hentry)
            ctx.total_rows.append([f"transformers/bf16 ({args.hf_attn}, {hentry['cache']})", B, hr.median_s * 1e3,
                                   fmt_bytes(lb), hentry["gbs"], hentry["roofline_pct"], None, None,
                                   timed[hf_first].median_s / hr.median_s, "-"])

    # ------------------------------------------------------------------ report
    def report(self, ctx, bw_end) -> dict[str, Any]:
        args, cfg, bw = ctx.args, ctx.cfg, ctx.bw
        for row in ctx.total_rows:  # the layer % again at the start / end-of-run bandwidths (drift range)
            bB = ctx.bw_cells.get(row[1], bw)
            row[6:6] = [row[5] * bB / bw if row[5] is not None else None,
                        row[5] * bB / bw_end if row[5] is not None and bw_end else None]
        for e in ctx.results + ctx.hf_results:
            p, bB = e["roofline_pct"], e["bandwidth_gbs"]
            e["roofline_pct_start_bw"] = p * bB / bw if p else None
            e["roofline_pct_end_bw"] = p * bB / bw_end if p and bw_end else None
        print()
        print_table(ctx.stage_rows, ["variant", "B", "stage", "impl", "ms (median)", "bytes", "GB/s", "% roofline",
                                     "% KV-read roofline"],
                    title=f"Per-stage decode step, {ctx.preset} layer, context {args.context}, median of "
                          f"{args.repeats}; % of the DRAM bandwidth probed round-robin with the runs: "
                          + ", ".join(f"B={k}: {v:.1f} GB/s" for k, v in ctx.bw_cells.items()))
        print()
        print_table(ctx.total_rows, ["variant", "B", "ms (median)", "bytes", "GB/s", "% roofline", "% at start bw",
                                     "% at end bw", "x vs ref (same quant)", "x vs ref/none",
                                     f"x vs transformers ({args.hf_cache[0]})", "cosine vs transformers"],
                    title="Layer totals")
        for n in ctx.notes:
            print(f"note: {n}")
        ctx.notes += [
            ("B sequences x 1 new token, every sequence at context L (position L); KV cache pre-filled with random "
             "bf16 N(0,1) K/V (no prefill)."),
            ("per-stage times from the engine StageTimer; 'other' = total - sum of stages (RoPE tables, block "
             "tables, glue)."),
            ("roofline bytes: llm_kernels.models.qwen3.roofline (weights once + KV read B*(L+1)*2*nkv*d*2 + KV "
             "write + bf16 activations); % roofline at the DRAM bandwidth of a torch.sum probe timed round-robin "
             "with the runs of the same batch (bandwidth_gbs_per_batch); also at the start / end-of-run bandwidths."),
            ("transformers: Qwen3DecoderLayer on the same bf16 weights (also the baseline of the w8a8 variants), "
             f"{args.hf_cache} cache(s) with the same K/V, no mask; speed-up and cosine vs the first."),
        ]
        return {
            "config": {"summary": cfg.summary(), "hidden_size": cfg.hidden_size,
                       "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
                       "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
            "batch": args.batch, "tokens": args.batch, "rows_per_seq": 1, "block_size": args.block_size,
            "bandwidth_gbs_per_batch": dict(ctx.bw_cells), "stage_impl": ctx.impl,
            "results": ctx.results, "transformers": ctx.hf_results,
        }

    def plot(self, data: dict[str, Any], path) -> Path:
        """One panel per batch size: stacked per-stage median ms per variant (+ transformers)."""
        from ..compare_runs import require_matplotlib

        plt = require_matplotlib()
        path = Path(path)
        batches = data["batch"]
        fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches) + 1, 5), squeeze=False)
        names = list(STAGES) + ["other"]
        cmap = plt.get_cmap("tab10")
        for ax, B in zip(axes[0], batches):
            rows = [r for r in data["results"] if r["batch"] == B]
            labels = []
            for j, r in enumerate(rows):
                bottom = 0.0
                for k, s in enumerate(names):
                    ms = max(r["stages"].get(s, {}).get("median_s", 0.0), 0.0) * 1e3
                    ax.bar(j, ms, 0.6, bottom=bottom, color=cmap(k), label=s if j == 0 else None)
                    bottom += ms
                labels.append(f"{r['backend']}\n{r['quant']}\n{r.get('roofline_pct') or 0:.0f}%")
            for h in (h for h in data["transformers"] if h["batch"] == B):
                ax.bar(len(labels), h["total"]["median_s"] * 1e3, 0.6, color="0.6", hatch="//")
                labels.append(f"transformers\n{h.get('cache', 'dynamic')}\n{h.get('roofline_pct') or 0:.0f}%")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel("ms (median)")
            per = data.get("bandwidth_gbs_per_batch") or {}
            bwB = per.get(str(B)) or per.get(B) or data["bandwidth_gbs"]
            ax.set_title(f"B={B}, DRAM {bwB:.1f} GB/s")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{data['preset']} decode layer per stage, context {data['context']} "
                     "(% = layer roofline at the DRAM bandwidth probed during the batch)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


ADAPTER = Qwen3Bench()
