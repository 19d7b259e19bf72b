"""DeepSeek-V4 adapter of the layer benchmark (``python -m llm_kernels bench --preset flash``).

For each layer type: one decoder layer of the preset with seeded random weights built in
memory (no checkpoint file), a cache state of ``B = T / rows_per_seq`` sequences at context
``L`` (random window rows, compressed entries, indexer keys and compressor buffers, all
consistent with position L), then one decode step (the engine's public sublayers
``attention_block`` + ``ffn_block``) of T rows is timed per stage (the runtime's
:class:`StageTimer`) and in total by the driver (:meth:`BenchContext.measure`: round-robin
with the DRAM probe; state restored before each run, untimed). Each stage is compared with
its memory roofline (:mod:`llm_kernels.models.deepseek_v4.roofline`). ``transformers``'
``DeepseekV4DecoderLayer`` runs the same step (bf16, the same weights, an equivalent
``DynamicCache``) for a speed-up figure and an output cross-check.

Routed experts: all ``--experts`` experts are routable, but an expert's weights are
generated the first time the gate routes a token to it (the first, untimed run) in a lazily
committed memory map, so only routed experts occupy RAM. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import gc
import math
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ...models.deepseek_v4 import roofline as rf
from ...models.deepseek_v4.config import CSA, HCA, SLIDING
from ...reference.deepseek_v4.model import LayerWeights
from ...runtime.deepseek_v4.engine import DeepSeekV4Engine
from ...runtime.timing import StageTimer
from ..core import L3_BYTES, BenchResult, csv, fmt_bytes, ints, print_table
from .hf import build_hf_layer, hf_mask
from .layer import CacheState, WeightBank, bf16r, seed_of

__all__ = ["ADAPTER", "DeepSeekV4Bench"]

BF16 = torch.bfloat16
SHORT = {SLIDING: "swa", CSA: "csa", HCA: "hca"}


def _stats(vals: list[float]) -> dict[str, float]:
    r = BenchResult.from_runs(vals)
    return {"median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s}


def _roof(nbytes: float, seconds: float, bw: float) -> tuple[float | None, float | None]:
    if seconds <= 0:
        return None, None
    return nbytes / seconds / 1e9, rf.roofline_pct(nbytes, seconds, bw)


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double().flatten(), b.double().flatten()
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_ref": a.abs().max().item(),
            "cosine": (a @ b / (a.norm() * b.norm())).item()}


def _ours_fn(cfg1, weights, ops, store, x_hc, ids, positions, offs, state: CacheState, outs, key):
    """Decode step of layer 0 through the runtime engine's public sublayers.

    The routed experts materialise when first routed, but a backend's ``prepare_weights``
    (load-time packing, run by the engine constructor) must see materialised experts: the
    engine is built with only the already materialised experts prepared (the others stay
    unprepared views of the store), and rebuilt once after the first (untimed) run, which
    routes — and materialises — the experts of this step."""
    real_moe, real_prep = ops.moe, getattr(ops, "prepare_weights", None)

    def moe(x, w, idx, experts, shared, **kw):
        store.ensure(torch.unique(idx).tolist(), key)
        return real_moe(x, w, idx, experts, shared, **kw)

    def prepare(w, cfg, consume=False):  # never consumes: the store keeps the raw experts
        if real_prep is None:
            return w
        ready = {k: v for k, v in w.items() if ".ffn.experts." not in k
                 or int(k.split(".ffn.experts.")[1].split(".")[0]) in store.filled}
        out = dict(real_prep(ready, cfg))
        out.update({k: v for k, v in w.items() if k not in ready})
        return out

    ops = SimpleNamespace(**{**vars(ops), "moe": moe, "prepare_weights": prepare})
    timer = StageTimer(enabled=True)
    stage_runs: list[dict[str, float]] = []
    built: list = []

    def build():
        eng = DeepSeekV4Engine(weights, cfg1, dtype=BF16, max_seq_len=state.max_seq_len, ops=ops, timer=timer)
        built[:] = [eng, LayerWeights(eng.w, 0)]

    build()

    def fn():
        eng, lw = built
        timer.reset()
        h = eng.attention_block(lw, 0, x_hc, positions, state.ours, offs)
        y = eng.ffn_block(lw, 0, h, ids)
        stage_runs.append(dict(timer.seconds))
        outs[key] = y
        if len(stage_runs) == 1 and real_prep is not None:
            build()   # untimed: the first run is measure()'s lone first run
    return fn, stage_runs


class DeepSeekV4Bench:
    """The driver's adapter (see :class:`llm_kernels.bench.driver.Adapter`)."""

    model_type = "deepseek_v4"  # the registry entry it serves (:mod:`llm_kernels.bench.adapters`)
    name = "bench_layer"
    description = ("Time one decoder layer's decode step per stage vs its memory roofline and vs "
                   "transformers (docs/benchmarks.md).")
    defaults = {"repeats": 5, "quant": ["w8a8"]}
    roofline = rf

    def add_arguments(self, p) -> None:
        g = p.add_argument_group("DeepSeek-V4 (--preset flash, pro, mini)")
        g.add_argument("--tokens", type=ints, default=[1, 2, 8], help="token rows T per step, comma-separated "
                       "(default 1,2,8)")
        g.add_argument("--rows-per-seq", type=int, default=1, help="new tokens per sequence S; a step of T rows "
                       "is T/S sequences of S tokens (default 1: T independent requests; 2 = spec §13's "
                       "4 requests x {tail, draft} at T=8)")
        g.add_argument("--layer-types", type=csv, default=["swa", "csa", "hca"], help="swa,csa,hca (default all)")
        g.add_argument("--experts", type=int, default=None, help="routed experts of the layer (default: the "
                       "preset's, 256 for Flash); all are routable, weights materialise on first routing")
        g.add_argument("--hf-context", type=int, default=None, help="context for the transformers run "
                       "(default: --context)")
        g.add_argument("--hf-experts-impl", default="grouped_mm", choices=["grouped_mm", "eager"],
                       help="transformers experts backend (default grouped_mm, transformers' CPU default)")
        g.add_argument("--no-lm-head", dest="lm_head", action="store_false", help="skip the LM head timing")

    def make_config(self, args, cfg):
        if args.experts is not None:
            if args.experts < 1:
                raise ValueError(f"--experts must be >= 1, got {args.experts}")
            cfg = cfg.replace(n_routed_experts=args.experts,
                              num_experts_per_tok=min(cfg.num_experts_per_tok, args.experts))
        return cfg

    def validate(self, args, cfg) -> str | None:
        try:
            args.lts = [rf.layer_type_name(t) for t in args.layer_types]
        except ValueError as e:
            return f"--layer-types: {e}"
        S = args.rows_per_seq
        if S <= 0 or any(T % S for T in args.tokens):
            return f"every --tokens value must be a multiple of --rows-per-seq ({S})"
        return None

    def variants(self, ctx) -> list[tuple[str, str]]:
        return [(b, q) for b in ctx.ops for q in ctx.args.quant]

    def estimate_bytes(self, ctx) -> int:
        """dense weights (+ INT8 copies) + routed experts of every T + lm_head"""
        cfg, args = ctx.cfg, ctx.args
        per_exp = 3 * cfg.moe_intermediate_size * cfg.hidden_size * (2 + (1 if "w8a8" in args.quant else 0))
        est = max(rf.weight_parts(cfg, lt, "bf16")["dense_total"] for lt in args.lts) * 1.4
        est += min(cfg.n_routed_experts, sum(T * cfg.num_experts_per_tok for T in args.tokens)) * per_exp
        est += cfg.vocab_size * cfg.hidden_size * 2 if args.lm_head else 0
        return int(est)

    # ------------------------------------------------------------------ run
    def run(self, ctx) -> None:
        args, cfg, log = ctx.args, ctx.cfg, ctx.log
        L, S = args.context, args.rows_per_seq
        hf_L = args.hf_context if args.hf_context is not None else L
        log(f"context L={L}, rows/seq S={S}, tokens {args.tokens}, layer types {[SHORT[t] for t in args.lts]}")
        ctx.notes += [
            f"T rows = T/{S} sequences x {S} new token(s), every sequence at context {L} (positions L..L+S-1).",
            (f"routed experts: all {cfg.n_routed_experts} routable; an expert's weights are generated when first "
             "routed (first run), so only routed experts occupy memory."),
            ("per-stage times from the runtime StageTimer; 'other' = step total minus the stages (pool "
             "concatenation, index lists, per-sequence loop)."),
            ("roofline bytes: llm_kernels.models.deepseek_v4.roofline (spec §14 kernel ABI for w8a8, all-bf16 for "
             "none) with E_act = experts actually routed in the timed step; % roofline at the DRAM bandwidth of a "
             "torch.sum probe timed round-robin with the runs of the same measurement (bandwidth_gbs_per_cell)."),
        ]
        if hf_L != L and args.transformers:
            ctx.notes.append(f"transformers measured at context {hf_L} instead of {L} (--hf-context).")
        ctx.results, ctx.hf_results, ctx.speedups = [], [], []
        ctx.stage_rows, ctx.total_rows = [], []
        bank = WeightBank(cfg, args.seed, args.quant)
        for lt in args.lts:
            cfg1 = cfg.replace(num_hidden_layers=1, layer_types=(lt,), mlp_layer_types=("moe",))
            tb = time.perf_counter()
            wts = {q: bank.layer_weights(cfg1, q) for q in args.quant}
            w_bf16 = wts.get("none") or bank.layer_weights(cfg1, "none")
            hf = None
            if args.transformers:
                try:
                    hf = build_hf_layer(cfg1, w_bf16, bank.experts, args.hf_experts_impl)
                except Exception as e:  # noqa: BLE001
                    ctx.errors.append(f"{SHORT[lt]}: transformers layer: {type(e).__name__}: {e}")
                    log(f"  transformers layer unavailable: {e}")
            log(f"[{SHORT[lt]}] weights ready in {time.perf_counter() - tb:.1f} s")
            for T in args.tokens:
                self._one(ctx, bank, cfg1, lt, T, wts, w_bf16, hf, hf_L)
                gc.collect()
            del wts, w_bf16, hf
            bank.drop_type_specific()
            bank.experts.release()
            gc.collect()
        ctx.lm_results = self._lm_head(ctx) if args.lm_head else []

    def _one(self, ctx, bank, cfg1, lt, T, wts, w_bf16, hf, hf_L) -> None:
        """One measurement: layer type ``lt``, T rows; every variant + transformers."""
        args, cfg, log = ctx.args, ctx.cfg, ctx.log
        L, S = args.context, args.rows_per_seq
        B = T // S
        g = torch.Generator().manual_seed(seed_of(args.seed, "input", lt, T))
        x_hc = bf16r(torch.randn(T, cfg.hc_mult, cfg.hidden_size, generator=g))
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
        positions = torch.arange(L, L + S).repeat(B)
        offs = [i * S for i in range(B + 1)]
        state = CacheState(cfg1, lt, B, S, L, args.seed, w_bf16)
        bank.experts.routed.clear()
        fns: dict[str, Callable] = {}
        setups: dict[str, Callable] = {}
        stage_log: dict[str, list] = {}
        outs: dict[str, torch.Tensor] = {}
        for bname, q in ctx.variants:
            key = f"{bname}/{q}"
            fn, sl = _ours_fn(cfg1, wts[q], ctx.ops[bname], bank.experts, x_hc, ids, positions, offs, state,
                              outs, key)
            fns[key], setups[key], stage_log[key] = fn, state.restore, sl
        if hf is not None:
            layer, hcfg, rotary = hf
            st_hf = state if hf_L == L else CacheState(cfg1, lt, B, S, hf_L, args.seed, w_bf16)
            dc, restore = st_hf.make_hf_cache(hcfg)
            hpos = torch.arange(hf_L, hf_L + S).expand(B, S)
            xh = x_hc.view(B, S, cfg.hc_mult, cfg.hidden_size).to(BF16)
            mask = hf_mask(B, S, hf_L, cfg.sliding_window)
            hids = ids.view(B, S)

            def hf_fn(layer=layer, rotary=rotary, dc=dc, hpos=hpos, xh=xh, mask=mask, hids=hids):
                pe = {p: rotary(xh, position_ids=hpos, layer_type=p) for p in ("main", "compress")}
                outs["transformers"] = layer(xh, position_embeddings=pe, position_ids=hpos,
                                             attention_mask=mask, input_ids=hids, cache=dc)
            fns["transformers"], setups["transformers"] = hf_fn, restore
        label = f"{SHORT[lt]} T={T}"
        # the first run of each variant (in measure) materialises the routed experts
        n_before = []
        timed, bw = ctx.measure(label, fns, setups, cell=label,
                                after_first=lambda: n_before.append(len(bank.experts.filled)))
        fills_in_timed = len(bank.experts.filled) - n_before[0]
        ref_out = outs.get("reference/none")
        for key, res in timed.items():
            if key == "transformers":
                continue
            bname, q = key.split("/")
            rq = ctx.roofline_quant(q)
            runs = stage_log[key][-args.repeats:]
            routed = bank.experts.routed.get(key, 0)
            bd = rf.layer_breakdown(cfg, lt, T, L, rq, rows_per_seq=S, experts_active=routed)
            stages = {}
            for sname in rf.LAYER_STAGES:
                secs = [r.get(sname, 0.0) for r in runs]
                if max(secs) == 0.0 and bd[sname].total == 0:
                    continue
                st = _stats(secs)
                nbytes = bd[sname].total
                gbs, pct = _roof(nbytes, st["median_s"], bw)
                stages[sname] = {**st, "runs": secs, "bytes": nbytes, "weight_bytes": bd[sname].weights,
                                 "cache_bytes": bd[sname].cache, "activation_bytes": bd[sname].activations,
                                 "gbs": gbs, "roofline_pct": pct, "roofline_s": rf.roofline_seconds(nbytes, bw)}
                ctx.stage_rows.append([SHORT[lt], key, T, sname, st["median_s"] * 1e3, fmt_bytes(nbytes), gbs, pct])
            other = [res.runs[i] - sum(r.values()) for i, r in enumerate(runs)] if len(runs) == len(res.runs) else []
            if other:
                stages["other"] = {**_stats(other), "runs": other}
                ctx.stage_rows.append([SHORT[lt], key, T, "other", stages["other"]["median_s"] * 1e3, "-", None, None])
            lbytes = sum(v.total for v in bd.values())
            gbs, pct = _roof(lbytes, res.median_s, bw)
            ctx.stage_rows.append([SHORT[lt], key, T, "LAYER TOTAL", res.median_s * 1e3, fmt_bytes(lbytes), gbs, pct])
            entry = {"layer_type": SHORT[lt], "T": T, "sequences": B, "rows_per_seq": S, "context": L,
                     "backend": bname, "quant": q, "total": res.to_dict(), "layer_bytes": lbytes,
                     "layer_bytes_default_experts": rf.layer_bytes(cfg, lt, T, L, rq, rows_per_seq=S),
                     "gbs": gbs, "roofline_pct": pct, "roofline_s": rf.roofline_seconds(lbytes, bw),
                     "bandwidth_gbs": bw, "experts_routed": routed, "experts_created_during_timing": fills_in_timed,
                     "weights_cold": lbytes >= 4 * L3_BYTES, "stages": stages}
            if ref_out is not None and key != "reference/none" and key in outs:
                entry["vs_reference_none"] = _compare(ref_out, outs[key])
            ctx.results.append(entry)
            ctx.total_rows.append([SHORT[lt], T, key, res.median_s * 1e3, fmt_bytes(lbytes), gbs, pct])
        if "transformers" in timed:
            res = timed["transformers"]
            routed = bank.experts.routed.get("transformers", 0)
            lbytes = rf.layer_bytes(cfg, lt, T, hf_L, "bf16", rows_per_seq=S, experts_active=routed)
            gbs, pct = _roof(lbytes, res.median_s, bw)
            hentry = {"layer_type": SHORT[lt], "T": T, "sequences": B, "rows_per_seq": S, "context": hf_L,
                      "dtype": "bf16", "experts_implementation": args.hf_experts_impl, "total": res.to_dict(),
                      "layer_bytes": lbytes, "gbs": gbs, "roofline_pct": pct, "bandwidth_gbs": bw}
            if ref_out is not None and hf_L == L:
                hentry["vs_reference_none"] = _compare(ref_out, outs["transformers"].float().reshape(ref_out.shape))
            ctx.hf_results.append(hentry)
            ctx.total_rows.append([SHORT[lt], T, "transformers/bf16" + (f" (L={hf_L})" if hf_L != L else ""),
                                   res.median_s * 1e3, fmt_bytes(lbytes), gbs, pct])
            for key, r in timed.items():
                if key != "transformers":
                    ctx.speedups.append({"layer_type": SHORT[lt], "T": T, "ours": key, "baseline": "transformers/bf16",
                                         "speedup": res.median_s / r.median_s, "same_context": hf_L == L})
        for q in args.quant:
            a, b_ = timed.get(f"reference/{q}"), timed.get(f"fused/{q}")
            if a is not None and b_ is not None:
                ctx.speedups.append({"layer_type": SHORT[lt], "T": T, "ours": f"fused/{q}",
                                     "baseline": f"reference/{q}", "speedup": a.median_s / b_.median_s,
                                     "same_context": True})
        log(f"[{label}] " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items())
            + f"; DRAM {bw:.1f} GB/s; routed experts {sorted(set(bank.experts.routed.values()))}, resident "
            f"{fmt_bytes(bank.resident_bytes())}")

    def _lm_head(self, ctx) -> list[dict[str, Any]]:
        """hc_head -> final RMSNorm -> BF16 LM head, per backend and T (weights >> L3 for real
        presets, so every call streams the head from DRAM)."""
        cfg, args = ctx.cfg, ctx.args
        D, HC, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
        g = torch.Generator().manual_seed(seed_of(args.seed, "lm_head"))
        head = torch.empty(V, D, dtype=BF16).normal_(0.0, 1.0 / math.sqrt(D), generator=g)
        hc_fn = torch.empty(HC, HC * D).normal_(0.0, 1.0 / math.sqrt(HC * D), generator=g)
        hc_base = torch.empty(HC).normal_(0.0, 0.5, generator=g)
        hc_scale = torch.empty(1).uniform_(0.5, 1.5, generator=g)
        norm = torch.empty(D).normal_(1.0, 0.1, generator=g)
        out = []
        for T in args.tokens:
            x = bf16r(torch.randn(T, HC, D, generator=g))
            fns = {}
            for bname, ops in ctx.ops.items():
                def fn(ops=ops, x=x):
                    y = ops.hc_head(x, hc_fn, hc_scale, hc_base, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps,
                                    dtype=BF16)
                    y = ops.rms_norm(y, norm, cfg.rms_norm_eps, BF16)
                    return ops.linear(y, head, BF16)
                fns[bname] = fn
            timed, bw = ctx.measure(f"lm_head T={T}", fns)
            nbytes = rf.lm_head_bytes(cfg, T)
            for bname, res in timed.items():
                gbs, pct = _roof(nbytes, res.median_s, bw)
                out.append({"backend": bname, "T": T, "total": res.to_dict(), "bytes": nbytes, "gbs": gbs,
                            "roofline_pct": pct, "bandwidth_gbs": bw, "weights_cold": nbytes >= 4 * L3_BYTES})
            ctx.log(f"[lm_head] T={T}: " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items()))
        return out

    # ------------------------------------------------------------------ report
    def report(self, ctx, bw_end) -> dict[str, Any]:
        args, cfg = ctx.args, ctx.cfg
        print()
        print_table(ctx.stage_rows, ["layer", "variant", "T", "stage", "ms (median)", "bytes", "GB/s", "% roofline"],
                    title=f"Per-stage decode step, {ctx.preset}, context {args.context}, median of {args.repeats}; "
                          "% of the DRAM bandwidth probed round-robin with the runs: "
                          + ", ".join(f"{k}: {v:.1f} GB/s" for k, v in ctx.bw_cells.items()))
        print()
        print_table(ctx.total_rows, ["layer", "T", "variant", "ms (median)", "bytes", "GB/s", "% roofline"],
                    title="Layer totals (attention + MoE sublayers)")
        if ctx.speedups:
            print()
            print_table([[s["layer_type"], s["T"], s["ours"], s["baseline"], s["speedup"]] for s in ctx.speedups],
                        ["layer", "T", "ours", "baseline", "speed-up (x)"], title="Speed-ups (baseline time / ours)")
        if ctx.lm_results:
            print()
            print_table([[r["backend"], r["T"], r["total"]["median_s"] * 1e3, fmt_bytes(r["bytes"]), r["gbs"],
                          r["roofline_pct"]] for r in ctx.lm_results],
                        ["backend", "T", "ms (median)", "bytes", "GB/s", "% roofline"], title="LM head (once per step)")
        return {
            "config": {"summary": cfg.summary(), "hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
                       "num_experts_per_tok": cfg.num_experts_per_tok,
                       "moe_intermediate_size": cfg.moe_intermediate_size,
                       "num_attention_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
                       "sliding_window": cfg.sliding_window, "index_topk": cfg.index_topk},
            "tokens": args.tokens, "rows_per_seq": args.rows_per_seq, "layer_types": [SHORT[t] for t in args.lts],
            "results": ctx.results, "transformers": ctx.hf_results, "speedups": ctx.speedups,
            "lm_head": ctx.lm_results,
        }

    def plot(self, data: dict[str, Any], path):
        from ..compare_runs import plot_results

        return plot_results(data, path)


ADAPTER = DeepSeekV4Bench()
