"""Decode-step benchmark of ONE Qwen3 decoder layer at real (Qwen3-32B) dimensions.

    python benchmarks/bench_qwen3_layer.py --preset qwen3-32b --batch 1,4,16 --context 4096
    python -m llm_kernels bench --preset qwen3-32b ...          (same flags)

Seeded random bf16 weights built in memory at ``write_random_checkpoint``'s Qwen3 scales
(``--quant w8a8``: the 7 projections per-channel INT8 via ``quantize_weight``). ``B``
sequences already hold ``--context`` tokens: the paged KV cache is filled with random bf16
K/V ~ N(0, 1) (K after q/k-norm + RoPE and V are O(1) at these scales), no prefill. Each
run reserves one slot per sequence, runs :meth:`Qwen3Engine.forward_rows` on a random
bf16-valued ``x [B, hidden]`` and is rolled back untimed. Per-stage times from the engine's
:class:`StageTimer` (``other`` = total − Σ stages: RoPE tables, block tables, glue).

% roofline: bytes from :mod:`llm_kernels.harness.roofline_qwen3` over the DRAM bandwidth of
a ``torch.sum`` probe (the ``measure_dram_bandwidth`` method) timed round-robin with the
variants of each batch — this VM's bandwidth moves 35-80 GB/s within a run; the layer % at
the start / end-of-run bandwidths is printed too. Attention also gets its % of the KV-read
roofline alone.

Baseline and cross-check: transformers' ``Qwen3DecoderLayer`` whose parameters ARE the bf16
tensors (``load_state_dict(assign=True)``), a ``DynamicCache`` (and/or ``StaticCache``,
``--hf-cache``) holding the same K/V, RoPE at position = context, no mask (one token per
sequence, equal lengths), its cache reset after each run. All variants are timed
round-robin (``interleaved``) after warm-up runs (Numba compiles in the first).

``reference/w8a8`` is opt-in (``--reference-w8a8``): the reference INT8 GEMM runs in float64,
converting each INT8 weight to float64 per call (~1 GB transient for gate/up at 32B dims):
a golden, not a speed baseline (1.9 s per step at B=1). A fused backend with no Qwen3 stage
fused (``backend_stages('fused', 'qwen3')``) is skipped and reported. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_kernels.errors import ConfigError
from llm_kernels.models.qwen3.config import Qwen3Config, qwen3_preset
from llm_kernels.harness import roofline_qwen3 as rq
from llm_kernels.harness.bench import (
    BenchResult,
    _mem_available,
    fmt_bytes,
    interleaved,
    machine_info,
    measure_dram_bandwidth,
    print_table,
    write_results,
)
from llm_kernels.numerics.quant import quantize_weight
from llm_kernels.runtime.backends import backend_stages, get_ops
from llm_kernels.runtime.paged_cache import PagedKVCache
from llm_kernels.runtime.qwen3.stages import STAGES
from llm_kernels.runtime.qwen3.engine import Qwen3Engine
from llm_kernels.runtime.timing import StageTimer

__all__ = ["KVState", "build_hf_layer", "build_parser", "build_weights", "main"]

BF16 = torch.bfloat16
QUANT_TO_ROOFLINE = {"none": "bf16", "w8a8": "w8a8"}
# engine stage -> ops attribute (backend_stages reports ops attributes)
STAGE_OPS = {"input_norm_qkv": "input_norm_qkv", "qk_norm_rope": "qk_norm_rope_cache",
             "attention": "paged_attention", "o_proj_residual_norm": "o_proj_residual_norm",
             "gate_up_swiglu": "gate_up_swiglu", "down_residual": "down_residual"}
PREFIX = "model.layers.0."


# ============================================================================ arguments
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        v = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The CLI of :func:`main` (also ``python -m llm_kernels bench --preset qwen3-*``)."""
    p = argparse.ArgumentParser(prog="bench_qwen3_layer", description="Time one Qwen3 decoder layer's decode "
                                "step per stage vs its memory roofline and vs transformers (docs/benchmarks.md).")
    p.add_argument("--preset", default="qwen3-32b", choices=["qwen3-32b", "qwen3-mini"])
    p.add_argument("--batch", type=_ints, default=[1, 4, 16], help="sequences B, one new token each (1,4,16)")
    p.add_argument("--context", type=int, default=4096, help="tokens already cached per sequence (default 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs, median reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2; Numba compiles)")
    p.add_argument("--block-size", type=int, default=16, help="KV page size in tokens (default 16)")
    p.add_argument("--backends", type=_csv, default=["reference", "fused"], help="reference and/or fused")
    p.add_argument("--quant", type=_csv, default=["none", "w8a8"], help="none (bf16) and/or w8a8")
    p.add_argument("--reference-w8a8", action="store_true", help="also time reference/w8a8 (float64 golden, slow)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention (sdpa)")
    p.add_argument("--hf-cache", type=_csv, default=["dynamic"], help="transformers cache(s): dynamic "
                   "(DynamicCache, generate()'s default: torch.cat of the whole K/V per step) and/or static "
                   "(StaticCache, in place); speed-ups are vs the first (default dynamic)")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/bench_<preset>.json")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="stacked per-stage bars")
    p.add_argument("--bandwidth", type=float, default=None, help="GB/s to use instead of measuring")
    p.add_argument("--bw-bytes", type=int, default=int(1.5 * 2 ** 30), help="bandwidth array bytes (1.5 GiB)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    for flag, field in (("--hidden", "hidden_size"), ("--intermediate", "intermediate_size"),
                        ("--heads", "num_attention_heads"), ("--kv-heads", "num_key_value_heads"),
                        ("--head-dim", "head_dim")):  # dimension overrides (tests)
        p.add_argument(flag, dest=field, type=int, default=None, help=argparse.SUPPRESS)
    return p


def _seed(seed: int, *parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ============================================================================ weights
def build_weights(cfg: Qwen3Config, seed: int, log: Callable[..., None] = print) -> dict[str, torch.Tensor]:
    """Layer-0 tensors ``model.layers.0.*`` (transformers names), bf16, seeded per name:
    2-D [out, in] ~ N(0, 1/sqrt(in)); norm vectors [n] ~ 1 + N(0, 0.1) (writer.py's Qwen3 rules)."""
    w: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    table = rq.weight_table(cfg, "bf16")
    total = sum(t.nbytes for t in table)
    done = 0
    for i, t in enumerate(table):
        g = torch.Generator().manual_seed(_seed(seed, t.name, t.shape))
        x = torch.empty(t.shape, dtype=BF16)
        if len(t.shape) == 2:
            x.normal_(0.0, 1.0 / math.sqrt(t.shape[1]), generator=g)
        else:
            x.normal_(1.0, 0.1, generator=g)
        w[PREFIX + t.name] = x
        done += t.nbytes
        if t.nbytes >= 2 ** 20:
            log(f"  weights [{i + 1}/{len(table)}] {t.name} {tuple(t.shape)}: {fmt_bytes(done)} of "
                f"{fmt_bytes(total)} ({time.perf_counter() - t0:.1f} s)")
    return w


def quantize_layer(w: dict[str, torch.Tensor], log: Callable[..., None] = print) -> dict[str, Any]:
    """The same dict with the 7 projections (``roofline_qwen3.PROJECTIONS``) as QuantWeight."""
    out: dict[str, Any] = dict(w)
    t0 = time.perf_counter()
    for i, name in enumerate(rq.PROJECTIONS):
        out[PREFIX + name] = quantize_weight(w[PREFIX + name])
        log(f"  quantise [{i + 1}/{len(rq.PROJECTIONS)}] {name} ({time.perf_counter() - t0:.1f} s)")
    return out


# ============================================================================ transformers
def build_hf_layer(cfg: Qwen3Config, w: dict[str, torch.Tensor], attn: str):
    """transformers ``Qwen3DecoderLayer`` (layer 0) whose parameters are the tensors of
    ``w`` (bf16, no copy), plus its config and rotary embedding. Returns (layer, hf_cfg, rotary)."""
    import transformers
    import transformers.models.qwen3.modeling_qwen3 as M

    h = transformers.Qwen3Config(**cfg.to_hf_dict())
    h._attn_implementation = attn
    with torch.device("meta"):
        layer = M.Qwen3DecoderLayer(h, 0)
    sd = {k[len(PREFIX):]: v for k, v in w.items() if k.startswith(PREFIX)}
    layer.load_state_dict(sd, strict=True, assign=True)
    layer.eval()
    return layer, h, M.Qwen3RotaryEmbedding(h)


# ============================================================================ cache state
class KVState:
    """B sequences at context L: our shared :class:`PagedKVCache` (one layer) and the dense
    ``[B, nkv, L, d]`` K/V of transformers' cache, holding the same random bf16 rows.
    :meth:`reserve` / :meth:`reset` give every run the same starting state."""

    def __init__(self, cfg: Qwen3Config, B: int, L: int, block_size: int, seed: int, hf: bool):
        self.B, self.L = B, L
        nkv, d = cfg.num_key_value_heads, cfg.head_dim
        nb = math.ceil((L + 1) / block_size)
        self.cache = PagedKVCache(cfg, B * nb, block_size, BF16, max_seq_len=L + 1, num_layers=1)
        self.seq_ids = list(range(B))
        self.hf_k: torch.Tensor | None = torch.empty(B, nkv, L, d, dtype=BF16) if hf else None
        self.hf_v: torch.Tensor | None = torch.empty(B, nkv, L, d, dtype=BF16) if hf else None
        nbl = math.ceil(L / block_size)
        for b in self.seq_ids:
            self.cache.add_sequence(b)
            if L:
                self.cache.reserve([b], [L])
            g = torch.Generator().manual_seed(_seed(seed, "kv", b, L))
            blocks = torch.tensor(self.cache.tables[b], dtype=torch.int64)
            for name, pages in (("k", self.cache.k[0]), ("v", self.cache.v[0])):
                dense = torch.zeros(nkv, nbl * block_size, d, dtype=BF16)
                dense[:, :L].normal_(0.0, 1.0, generator=g)
                if L:
                    pages[blocks] = dense.view(nkv, nbl, block_size, d).permute(1, 0, 2, 3)
                if hf:
                    (self.hf_k if name == "k" else self.hf_v)[b] = dense[:, :L]
        self.pending = False
        self.slots: torch.Tensor | None = None

    def reset(self) -> None:
        """Undo the pending one-token reservation (if any)."""
        if self.pending:
            self.cache.rollback(self.seq_ids, [1] * self.B)
            self.pending = False

    def reserve(self) -> None:
        """Back to context L, then reserve one slot per sequence (``self.slots``)."""
        self.reset()
        self.slots = self.cache.reserve(self.seq_ids, [1] * self.B)
        self.pending = True

    def hf_cache(self, hf_cfg, kind: str = "dynamic"):
        """(transformers cache holding the K/V, restore()); restore undoes a run's new row.
        ``dynamic``: DynamicCache over the dense K/V (a run concatenates a new tensor);
        ``static``: StaticCache of L+1 rows, the first L filled (a run writes row L in place)."""
        from transformers.cache_utils import DynamicCache, StaticCache

        if kind == "dynamic":
            dc = DynamicCache(config=hf_cfg)
            layer = dc.layers[0]
            layer.lazy_initialization(self.hf_k, self.hf_v)

            def restore():
                layer.keys, layer.values = self.hf_k, self.hf_v
        elif kind == "static":
            dc = StaticCache(config=hf_cfg, max_cache_len=self.L + 1)
            layer = dc.layers[0]
            layer.lazy_initialization(self.hf_k[:, :, :1], self.hf_v[:, :, :1])
            layer.keys[:, :, :self.L] = self.hf_k
            layer.values[:, :, :self.L] = self.hf_v

            def restore():
                layer.cumulative_length.fill_(self.L)
        else:
            raise ValueError(f"transformers cache must be dynamic or static, got {kind!r}")
        restore()
        return dc, restore


# ============================================================================ helpers
def _stats(vals: list[float]) -> dict[str, float]:
    r = BenchResult.from_runs(vals)
    return {"median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s}


def _compare(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    a, b = ref.double().flatten(), x.double().flatten()
    return {"cosine": (a @ b / (a.norm() * b.norm())).item(), "max_abs_diff": (a - b).abs().max().item(),
            "max_abs_ref": a.abs().max().item()}


def _gbs(nbytes: float, s: float) -> float | None:
    return nbytes / s / 1e9 if s > 0 else None


def _make_config(args) -> Qwen3Config:
    cfg = qwen3_preset(args.preset, num_hidden_layers=1)
    over = {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim") if getattr(args, k) is not None}
    return cfg.replace(**over) if over else cfg


def _variant_entry(cfg, key, res, runs, B, L, bw, impl, stage_rows) -> dict[str, Any]:
    """JSON entry of one variant at batch B: per-stage stats (``runs``: the timed runs' StageTimer
    seconds) with bytes, GB/s, % roofline at ``bw`` GB/s; appends the printed rows to ``stage_rows``."""
    b, q = key.split("/")
    bd = rq.layer_breakdown(cfg, B, L, QUANT_TO_ROOFLINE[q])
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
        stage_rows.append([key, B, s, impl[s], sm["median_s"] * 1e3, fmt_bytes(nb), e["gbs"], e["roofline_pct"],
                           e.get("kv_roofline_pct")])
    other = [t - sum(r.get(s, 0.0) for s in STAGES) for t, r in zip(res.runs, runs)]
    stages["other"] = {**_stats(other), "runs": other}
    stage_rows.append([key, B, "other", "-", stages["other"]["median_s"] * 1e3, "-", None, None, None])
    lb = sum(v.total for v in bd.values())
    pct = rq.roofline_pct(lb, res.median_s, bw)
    stage_rows.append([key, B, "LAYER TOTAL", "", res.median_s * 1e3, fmt_bytes(lb), _gbs(lb, res.median_s), pct, None])
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


def _plot(data: dict[str, Any], path: Path) -> Path:
    """One panel per batch size: stacked per-stage median ms per variant (+ transformers)."""
    from llm_kernels.harness.compare_runs import require_matplotlib

    plt = require_matplotlib()
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
        hf = [h for h in data["transformers"] if h["batch"] == B]
        for h in hf:
            ax.bar(len(labels), h["total"]["median_s"] * 1e3, 0.6, color="0.6", hatch="//")
            labels.append(f"transformers\n{h.get('cache', 'dynamic')}\n{h.get('roofline_pct') or 0:.0f}%")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms (median)")
        bwB = (data.get("bandwidth_gbs_per_batch") or {}).get(str(B)) or (data.get(
            "bandwidth_gbs_per_batch") or {}).get(B) or data["bandwidth_gbs"]
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


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, 1 (a variant failed; the rest is reported), 2 (bad
    arguments / nothing to run) or 3 (not enough memory)."""
    args = build_parser().parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    err = None
    if not args.quant or any(q not in QUANT_TO_ROOFLINE for q in args.quant):
        err = f"--quant must be a list of none, w8a8; got {args.quant}"
    elif not args.hf_cache or any(c not in ("dynamic", "static") for c in args.hf_cache):
        err = f"--hf-cache must be a list of dynamic, static; got {args.hf_cache}"
    elif args.repeats < 1 or args.warmup < 0 or args.context < 0 or args.block_size < 1:
        err = "--repeats >= 1, --warmup >= 0, --context >= 0, --block-size >= 1 required"
    else:
        try:
            cfg = _make_config(args)
            if args.context + 1 > cfg.max_position_embeddings:
                err = f"--context {args.context} + 1 exceeds max_position_embeddings {cfg.max_position_embeddings}"
            if args.plot is not None:
                from llm_kernels.harness.compare_runs import require_matplotlib
                require_matplotlib()
        except (ConfigError, RuntimeError) as e:
            err = str(e)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    L = args.context
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.json or Path(__file__).resolve().parent / "results" / f"bench_{args.preset.replace('-', '_')}.json"

    backend_status: dict[str, str] = {}
    fused_where: dict[str, dict[str, str]] = {}
    variants: list[tuple[str, str]] = []
    notes: list[str] = []
    for b in args.backends:
        try:
            get_ops(b, "qwen3")
            where = backend_stages(b, "qwen3")
        except Exception as e:  # noqa: BLE001
            backend_status[b] = f"unavailable: {type(e).__name__}: {e}"
            continue
        impl = {s: where.get(op, "reference") for s, op in STAGE_OPS.items()}
        fused_where[b] = impl
        if b == "fused" and "fused" not in impl.values():
            backend_status[b] = "skipped: no Qwen3 stage is fused yet (backend_stages('fused', 'qwen3'))"
            continue
        backend_status[b] = "ok" + (f" (fused: {[s for s, v in impl.items() if v == 'fused']})" if b == "fused" else "")
        for q in args.quant:
            if b == "reference" and q == "w8a8" and not args.reference_w8a8:
                notes.append("reference/w8a8 not timed (pass --reference-w8a8): the reference INT8 GEMM runs in "
                             "float64 and converts every INT8 weight to float64 per call (~1 GB transient for "
                             "gate/up/down at 32B dims); a golden, not a speed baseline.")
                continue
            variants.append((b, q))
    for b, s in backend_status.items():
        log(f"backend {b}: {s}")
    if not variants and not args.transformers:
        print("error: nothing to run (no usable backend/quant variant)", file=sys.stderr)
        return 2
    quants_needed = sorted({q for _, q in variants})

    kv = 2 * max(args.batch) * (L + 1 + args.block_size) * cfg.kv_size * 2   # one paged / dense K+V copy
    est = (rq.layer_weight_bytes(cfg, "bf16") + rq.layer_weight_bytes(cfg, "w8a8") * ("w8a8" in quants_needed)
           + kv * (2 + len(args.hf_cache) if args.transformers else 1) + (0 if args.bandwidth else args.bw_bytes)
           + max(cfg.intermediate_size, cfg.q_size) * cfg.hidden_size * 12)  # float64 copy / quantise temporaries
    avail = _mem_available()
    log(f"{cfg.summary()}; context {L}, batch {args.batch}, variants {[f'{b}/{q}' for b, q in variants]}; "
        f"estimated peak {fmt_bytes(est)}" + (f" (available {fmt_bytes(avail)})" if avail else ""))
    if avail is not None and est > 0.9 * avail:
        print(f"error: needs about {fmt_bytes(est)}, only {fmt_bytes(avail)} available", file=sys.stderr)
        return 3

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"warning: 1-minute load average {load_before:.2f}: other processes compete for the cores")
    if args.bandwidth:
        bw, bw_src = float(args.bandwidth), "given (--bandwidth)"
    else:
        bw = measure_dram_bandwidth(args.bw_bytes)
        bw_src = f"measured: median of 5 x torch.sum over a {fmt_bytes(args.bw_bytes)} float32 array"
    log(f"DRAM read bandwidth at the start {bw:.1f} GB/s; torch threads {torch.get_num_threads()}")

    log("building weights ...")
    w_bf16 = build_weights(cfg, args.seed, log)
    weights = {"none": w_bf16}
    if "w8a8" in quants_needed:
        weights["w8a8"] = quantize_layer(w_bf16, log)
    hf = None
    errors: list[str] = []
    if args.transformers:
        try:
            hf = build_hf_layer(cfg, w_bf16, args.hf_attn)
        except Exception as e:  # noqa: BLE001
            errors.append(f"transformers layer: {type(e).__name__}: {e}")
            log(f"  transformers layer unavailable: {e}")
    log(f"weights ready ({time.perf_counter() - t0:.1f} s)")
    # bandwidth probe timed round-robin WITH the variants (same method as measure_dram_bandwidth:
    # torch.sum over a float32 array of distinct values): the bandwidth of the same minutes
    probe = None if args.bandwidth else torch.arange(max(args.bw_bytes, 2 ** 26) // 4, dtype=torch.float32)
    bw_batch: dict[int, float] = {}

    results: list[dict[str, Any]] = []
    hf_results: list[dict[str, Any]] = []
    stage_rows: list[list[Any]] = []
    total_rows: list[list[Any]] = []
    with torch.inference_mode():
        for B in args.batch:
            tb = time.perf_counter()
            st = KVState(cfg, B, L, args.block_size, args.seed, hf is not None)
            g = torch.Generator().manual_seed(_seed(args.seed, "x", B))
            x = torch.randn(B, cfg.hidden_size, generator=g).to(BF16).float()
            log(f"[B={B}] KV cache filled: {fmt_bytes(st.cache.nbytes())} ({time.perf_counter() - tb:.1f} s)")
            fns: dict[str, Callable] = {}
            setups: dict[str, Callable] = {}
            stage_log: dict[str, list[dict[str, float]]] = {}
            outs: dict[str, torch.Tensor] = {}
            for b, q in variants:
                key = f"{b}/{q}"
                timer = StageTimer(enabled=True)
                eng = Qwen3Engine(weights[q], cfg, dtype=BF16, max_seq_len=L + 1, max_batch=1,
                                  block_size=args.block_size, num_blocks=1, ops=get_ops(b, "qwen3"),
                                  timer=timer, num_layers=1)
                eng.cache = st.cache  # every variant runs on the same filled cache
                runs: list[dict[str, float]] = []

                def fn(eng=eng, timer=timer, runs=runs, key=key, st=st, outs=outs, x=x, B=B):
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

                def hf_fn(layer=layer, rotary=rotary, dc=dc, xh=xh, pos=pos, outs=outs, hkey=hkey):
                    pe = rotary(xh, position_ids=pos)
                    outs[hkey] = layer(xh, attention_mask=None, position_ids=pos, past_key_values=dc,
                                       use_cache=True, position_embeddings=pe)
                fns[hkey], setups[hkey] = hf_fn, restore
            for key in list(fns):  # first run alone: compiles, and a failing variant is dropped
                try:
                    ta = time.perf_counter()
                    setups[key]()
                    fns[key]()
                    log(f"[B={B}] {key}: first run {time.perf_counter() - ta:.2f} s")
                except Exception as e:  # noqa: BLE001
                    errors.append(f"B={B} {key}: {type(e).__name__}: {e}")
                    log(f"  {key} failed: {type(e).__name__}: {e}")
                    del fns[key]
            if fns and probe is not None:
                fns["dram_probe"] = probe.sum
            timed = interleaved(fns, repeats=args.repeats, warmup=max(args.warmup - 1, 0), setups=setups) if fns else {}
            st.reset()
            pr = timed.pop("dram_probe", None)
            bwB = bw_batch[B] = probe.numel() * 4 / pr.median_s / 1e9 if pr is not None else bw
            hf_first = next((k for k in hf_keys if k in timed), None)   # the speed-up / cross-check baseline
            hf_out = outs[hf_first].float().reshape(B, cfg.hidden_size) if hf_first else None
            ref_out = outs.get("reference/none")
            for key, res in timed.items():
                if not key.startswith("transformers"):
                    entry = _variant_entry(cfg, key, res, stage_log[key][-args.repeats:], B, L, bwB,
                                           fused_where[key.split("/")[0]], stage_rows)
                    _cross_check(entry, key, timed, outs, hf_keys, hf_first, hf_out)
                    results.append(entry)
                    total_rows.append([key, B, res.median_s * 1e3, fmt_bytes(entry["layer_bytes"]), entry["gbs"],
                                       entry["roofline_pct"], entry.get("speedup_vs_reference"),
                                       entry.get("speedup_vs_reference_none"), entry.get("speedup_vs_transformers"),
                                       f"{entry['vs_transformers']['cosine']:.6f}" if hf_out is not None else "-"])
            for hkey in hf_keys:
                if hkey not in timed:
                    continue
                hr, lb = timed[hkey], rq.layer_bytes(cfg, B, L, "bf16")
                hentry = {"batch": B, "context": L, "dtype": "bf16", "attn_implementation": args.hf_attn,
                          "cache": hkey.split("/")[1], "total": hr.to_dict(), "layer_bytes": lb,
                          "gbs": _gbs(lb, hr.median_s), "roofline_pct": rq.roofline_pct(lb, hr.median_s, bwB), "bandwidth_gbs": bwB}
                if ref_out is not None:
                    hentry["vs_reference_none"] = _compare(ref_out, outs[hkey].float().reshape(B, cfg.hidden_size))
                hf_results.append(hentry)
                total_rows.append([f"transformers/bf16 ({args.hf_attn}, {hentry['cache']})", B, hr.median_s * 1e3,
                                   fmt_bytes(lb), hentry["gbs"], hentry["roofline_pct"], None, None,
                                   timed[hf_first].median_s / hr.median_s, "-"])
            log(f"[B={B}] " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items())
                + f"; DRAM {bwB:.1f} GB/s ({time.perf_counter() - tb:.1f} s)")
            del st, fns, setups, outs, timed
            gc.collect()

    del probe
    gc.collect()
    bw_end = None if args.bandwidth else measure_dram_bandwidth(args.bw_bytes)
    for row in total_rows:  # the layer % again at the start / end-of-run bandwidths (drift range)
        bB = bw_batch.get(row[1], bw)
        row[6:6] = [row[5] * bB / bw if row[5] is not None else None,
                    row[5] * bB / bw_end if row[5] is not None and bw_end else None]
    for e in results + hf_results:
        p, bB = e["roofline_pct"], e["bandwidth_gbs"]
        e["roofline_pct_start_bw"] = p * bB / bw if p else None
        e["roofline_pct_end_bw"] = p * bB / bw_end if p and bw_end else None
    print()
    print_table(stage_rows, ["variant", "B", "stage", "impl", "ms (median)", "bytes", "GB/s", "% roofline",
                             "% KV-read roofline"],
                title=f"Per-stage decode step, {args.preset} layer, context {L}, median of {args.repeats}; "
                      "% of the DRAM bandwidth probed round-robin with the runs: " + ", ".join(
                          f"B={k}: {v:.1f} GB/s" for k, v in bw_batch.items()))
    print()
    print_table(total_rows, ["variant", "B", "ms (median)", "bytes", "GB/s", "% roofline", "% at start bw",
                             "% at end bw",
                             "x vs ref (same quant)", "x vs ref/none", f"x vs transformers ({args.hf_cache[0]})", "cosine vs transformers"],
                title="Layer totals")
    log(f"\nDRAM read bandwidth: start {bw:.1f} GB/s, end " + (f"{bw_end:.1f}" if bw_end else "-")
        + " GB/s; during the runs (interleaved probe) " + ", ".join(f"B={k}: {v:.1f}" for k, v in bw_batch.items())
        + " GB/s ('% roofline' uses the probe of its batch)")
    for b, s in backend_status.items():
        if s != "ok":
            print(f"backend {b}: {s}")
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}")
    notes += [
        ("B sequences x 1 new token, every sequence at context L (position L); KV cache pre-filled with random "
         "bf16 N(0,1) K/V (no prefill)."),
        ("per-stage times from the engine StageTimer; 'other' = total - sum of stages (RoPE tables, block tables, "
         "glue)."),
        ("roofline bytes: llm_kernels.harness.roofline_qwen3 (weights once + KV read B*(L+1)*2*nkv*d*2 + KV write "
         "+ bf16 activations); % roofline at the DRAM bandwidth of a torch.sum probe timed round-robin with the "
         "runs of the same batch (bandwidth_gbs_per_batch); also at the start / end-of-run bandwidths."),
        ("transformers: Qwen3DecoderLayer on the same bf16 weights (also the baseline of the w8a8 variants), "
         f"{args.hf_cache} cache(s) with the same K/V, no mask; speed-up and cosine vs the first."),
    ]
    data = {
        "benchmark": "bench_qwen3_layer", "argv": list(argv) if argv is not None else sys.argv[1:],
        "preset": args.preset,
        "config": {"summary": cfg.summary(), "hidden_size": cfg.hidden_size,
                   "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
                   "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
        "batch": args.batch, "tokens": args.batch, "context": L, "rows_per_seq": 1, "block_size": args.block_size,
        "quant": args.quant, "variants": [f"{b}/{q}" for b, q in variants], "repeats": args.repeats,
        "warmup": args.warmup, "bandwidth_gbs": bw, "bandwidth_source": bw_src, "bandwidth_gbs_end": bw_end,
        "bandwidth_gbs_per_batch": bw_batch,
        "backends": backend_status, "stage_impl": fused_where, "notes": notes, "errors": errors,
        "results": results, "transformers": hf_results, "wall_s": time.perf_counter() - t0,
        "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
    }
    path = write_results(json_path, data, machine=machine_info(bw, bw_src))
    log(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.plot is not None:
        log(f"wrote {_plot(data, args.plot)}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
