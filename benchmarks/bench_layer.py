"""Decode-step benchmark of ONE DeepSeek-V4 decoder layer at real dimensions.

    python benchmarks/bench_layer.py --preset flash --tokens 1,8 --context 4096 \
        --layer-types swa,csa,hca --backends reference --quant none,w8a8

For each layer type: one decoder layer of the preset with seeded random weights built in
memory (no checkpoint file), a cache state of ``B = T / rows_per_seq`` sequences at context
``L`` (random window rows, compressed entries, indexer keys and compressor buffers, all
consistent with position L), then one decode step (attention sublayer + MoE sublayer) of T
rows is timed, per stage (the runtime's :class:`StageTimer`) and in total, median of
``--repeats`` runs (state restored before each run, untimed). Each stage is compared with
its memory roofline (:mod:`llm_kernels.harness.roofline`) at the DRAM bandwidth measured at
the start of the same run. ``transformers``' ``DeepseekV4DecoderLayer`` runs the same step
(bf16, the same weights, an equivalent ``DynamicCache``) for a speed-up figure and an
output cross-check.

Routed experts: all ``--experts`` experts are routable (the gate has every row), but an
expert's weights are generated the first time the gate routes a token to it (during the
warm-up runs) in a lazily committed memory map, so only routed experts occupy RAM
(Flash bf16 with 256 resident experts would need 12.9 GB). Timed runs reuse them; the JSON
records how many were materialised and that none was created inside a timed run.

The CLI logic lives in :func:`main` so ``python -m llm_kernels bench`` can call it.
See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import math
import mmap
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_kernels.checkpoint.names import expected_tensors  # noqa: E402
from llm_kernels.checkpoint.safetensors_io import is_fp32_tensor  # noqa: E402
from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING, DeepSeekV4Config  # noqa: E402
from llm_kernels.models import preset  # noqa: E402
from llm_kernels.harness import roofline as rf  # noqa: E402
from llm_kernels.harness.bench import (  # noqa: E402
    L3_BYTES,
    BenchResult,
    fmt_bytes,
    interleaved,
    machine_info,
    measure_dram_bandwidth,
    print_table,
    write_results,
)
from llm_kernels.reference.deepseek_v4.model import LayerWeights  # noqa: E402
from llm_kernels.numerics.quant import QuantWeight, quantize_weight  # noqa: E402
from llm_kernels.runtime.deepseek_v4.cache import SequenceCache  # noqa: E402
from llm_kernels.runtime.deepseek_v4.stages import REFERENCE_OPS  # noqa: E402
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine  # noqa: E402
from llm_kernels.runtime.timing import StageTimer  # noqa: E402

__all__ = ["main", "build_parser", "resolve_backend", "FUSED_MODULE"]

BF16 = torch.bfloat16
FUSED_MODULE = "llm_kernels.kernels.deepseek_v4"
SHORT = {SLIDING: "swa", CSA: "csa", HCA: "hca"}
QUANT_TO_ROOFLINE = {"none": "bf16", "w8a8": "w8a8"}
# Tensors stored INT8 (+ per-row scale) in the W8A8 kernel ABI (spec §14); experts separately.
INT8_NAMES = ("attn.wq_b.weight", "attn.wo_b.weight", "attn.indexer.wq_b.weight",
              "ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight", "ffn.shared_experts.w2.weight")


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


def _bytes_arg(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(t[-1:], 1)
    try:
        return int(float(t.rstrip("KMGB") if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 1.5G or 64M, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_layer", description="Time one DeepSeek-V4 decoder layer's decode step per stage vs "
        "its memory roofline and vs transformers (docs/benchmarks.md).")
    # "mini" is accepted for tests but not advertised.
    p.add_argument("--preset", default="flash", choices=["flash", "pro", "mini"], metavar="{flash,pro}",
                   help="model preset (default flash)")
    p.add_argument("--tokens", type=_ints, default=[1, 2, 8], help="token rows T per step, comma-separated "
                   "(default 1,2,8)")
    p.add_argument("--context", type=int, default=4096, help="context length L: tokens already in every "
                   "sequence's cache (default 4096)")
    p.add_argument("--rows-per-seq", type=int, default=1, help="new tokens per sequence S; a step of T rows is "
                   "T/S sequences of S tokens (default 1: T independent requests; 2 = spec §13's "
                   "4 requests x {tail, draft} at T=8)")
    p.add_argument("--layer-types", type=_csv, default=["swa", "csa", "hca"], help="swa,csa,hca (default all)")
    p.add_argument("--experts", type=int, default=None, help="routed experts of the layer (default: the "
                   "preset's, 256 for Flash); all are routable, weights materialise on first routing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--json", type=Path, default=None, help="result file (default "
                   "benchmarks/results/bench_<preset>.json)")
    p.add_argument("--backends", type=_csv, default=["reference", "fused"],
                   help="reference and/or fused (default reference,fused)")
    p.add_argument("--quant", type=_csv, default=["w8a8"], help="none (bf16 weights) and/or w8a8 "
                   "(INT8 per spec §14 kernel ABI); default w8a8, the fast path")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the transformers DeepseekV4DecoderLayer comparison")
    p.add_argument("--hf-context", type=int, default=None, help="context for the transformers run "
                   "(default: --context)")
    p.add_argument("--hf-experts-impl", default="grouped_mm", choices=["grouped_mm", "eager"],
                   help="transformers experts backend (default grouped_mm, transformers' CPU default)")
    p.add_argument("--no-lm-head", dest="lm_head", action="store_false", help="skip the LM head timing")
    p.add_argument("--bandwidth", type=float, default=None, help="DRAM bandwidth in GB/s to use instead of "
                   "measuring it")
    p.add_argument("--bw-bytes", type=_bytes_arg, default=int(1.5 * 2 ** 30), help="array size of the "
                   "bandwidth measurement (default 1.5G)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only the tables")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="also write a PNG: per-stage "
                   "time and %% of roofline per layer type and T (needs matplotlib: pip install -e '.[plot]')")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULT.json", help="do not benchmark: "
                   "read this result file (use with --plot)")
    p.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="do not benchmark: paired comparison of two result files (median A, median B, "
                   "B/A, per-run pair ratios); docs/performance.md")
    p.add_argument("--variants", type=_csv, default=None, help="with --compare: only these backend/quant "
                   "variants, e.g. fused/w8a8")
    p.add_argument("--no-stages", dest="stages", action="store_false", help="with --compare: layer totals only")
    return p


def _offline(args) -> int | None:
    """--compare / --from-json modes (no benchmark). None when a benchmark should run."""
    from llm_kernels.harness import compare_runs as cr

    if args.compare is None and args.from_json is None:
        return None
    try:
        if args.compare is not None:
            a, b = (cr.load_results(p) for p in args.compare)
            cmp = cr.compare_results(a, b, variants=args.variants)
            print(cr.format_comparison(cmp, str(args.compare[0]), str(args.compare[1]), stages=args.stages))
        if args.from_json is not None:
            if args.plot is None:
                print("error: --from-json needs --plot FILE.png", file=sys.stderr)
                return 2
            print(f"wrote {cr.plot_results(cr.load_results(args.from_json), args.plot)}")
        elif args.plot is not None:
            print("error: --plot with --compare needs --from-json (which result to plot)", file=sys.stderr)
            return 2
    except (cr.CompareError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ============================================================================ backends
def resolve_backend(name: str) -> tuple[SimpleNamespace | None, Any, str | None]:
    """(ops, module, None) or (None, None, reason). ``reference``: the runtime's
    REFERENCE_OPS. ``fused``: ``llm_kernels.runtime.backends.get_ops("fused")`` (Numba kernels
    for every stage that has one, reference for the rest)."""
    if name == "reference":
        return REFERENCE_OPS, None, None
    if name == "fused":
        try:
            from llm_kernels.runtime.backends import get_ops

            return get_ops("fused"), None, None
        except Exception as e:  # noqa: BLE001
            return None, None, f"fused backend unavailable: {type(e).__name__}: {e}"
    return None, None, f"unknown backend {name!r} (choose reference, fused)"


# ============================================================================ weights
def _seed(seed: int, *parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _init_tensor(name: str, shape: tuple[int, ...], cfg: DeepSeekV4Config, seed: int) -> torch.Tensor:
    """Seeded random tensor at the init scales of ``write_random_checkpoint`` (activations
    O(1)), generated directly in its storage dtype (FP32 suffixes float32, else bf16)."""
    g = torch.Generator().manual_seed(_seed(seed, name, shape))
    dt = torch.float32 if is_fp32_tensor(name) else BF16
    t = torch.empty(shape, dtype=dt)
    leaf = name.rsplit(".", 1)[-1]
    D, HC = cfg.hidden_size, cfg.hc_mult
    if name.endswith(("hc_attn_fn", "hc_ffn_fn")):
        return t.normal_(0.0, 1.0 / math.sqrt(HC * D), generator=g)
    if name.endswith(("hc_attn_base", "hc_ffn_base")):
        return t.normal_(0.0, 0.5, generator=g)
    if name.endswith(("hc_attn_scale", "hc_ffn_scale")):
        return t.uniform_(0.5, 1.5, generator=g)
    if leaf in ("attn_sink",):
        return t.normal_(0.0, 1.0, generator=g)
    if leaf == "ape":
        return t.normal_(0.0, 0.5, generator=g)
    if name.endswith("gate.bias"):
        return t.normal_(0.0, 0.1, generator=g)
    if name.endswith("ffn.gate.weight"):
        return t.normal_(0.0, 1.0 / math.sqrt(D), generator=g)
    if name.endswith("norm.weight"):
        return t.normal_(1.0, 0.1, generator=g)
    if len(shape) == 2:
        return t.normal_(0.0, 1.0 / math.sqrt(shape[1]), generator=g)
    raise ValueError(f"no init rule for {name} {shape}")


def lazy_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """An uninitialised tensor in an anonymous MAP_NORESERVE mapping: pages cost memory only
    once written (reads of untouched pages see zeros). Returns (tensor, mapping)."""
    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    mm = mmap.mmap(-1, max(n, 1), flags=flags)
    t = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape)).view(shape)
    return t, mm


class ExpertStore:
    """All routed experts of one layer in transformers' layout (``gate_up [E, 2I, D]`` =
    w1 ‖ w3, ``down [E, D, I]`` = w2, bf16) plus, for W8A8, their INT8 copies; memory is
    committed for an expert only when :meth:`ensure` first materialises it."""

    def __init__(self, cfg: DeepSeekV4Config, seed: int, int8: bool):
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.E, self.I, self.D, self.seed = E, I, D, seed
        self._maps = []
        self.gate_up = self._alloc((E, 2 * I, D), BF16)
        self.down = self._alloc((E, D, I), BF16)
        self.int8 = int8
        if int8:
            self.q_gate_up = self._alloc((E, 2 * I, D), torch.int8)
            self.q_down = self._alloc((E, D, I), torch.int8)
            self.s_gate_up = torch.zeros(E, 2 * I)
            self.s_down = torch.zeros(E, D)
        self.filled: set[int] = set()
        self.routed: dict[str, int] = {}   # tag -> distinct experts of its last routing

    def _alloc(self, shape, dtype):
        t, mm = lazy_empty(shape, dtype)
        self._maps.append(mm)
        return t

    @property
    def bytes_per_expert(self) -> int:
        b = 3 * self.I * self.D * 2
        return b + (3 * self.I * self.D + 4 * (2 * self.I + self.D) if self.int8 else 0)

    def ensure(self, experts, tag: str = "") -> None:
        """Materialise the given experts if needed; remember how many were routed under ``tag``."""
        ids = sorted({int(e) for e in experts})
        self.routed[tag] = len(ids)
        for e in ids:
            if e not in self.filled:
                self._fill(e)

    def _fill(self, e: int) -> None:
        g = torch.Generator().manual_seed(_seed(self.seed, "expert", e))
        self.gate_up[e].normal_(0.0, 1.0 / math.sqrt(self.D), generator=g)
        self.down[e].normal_(0.0, 1.0 / math.sqrt(self.I), generator=g)
        if self.int8:
            for w, q, s in ((self.gate_up[e], self.q_gate_up[e], self.s_gate_up[e]),
                            (self.down[e], self.q_down[e], self.s_down[e])):
                qw = quantize_weight(w)  # per output row = per row of w1, w3 separately
                q.copy_(qw.qweight)
                s.copy_(qw.scale)
        self.filled.add(e)

    def release(self) -> None:
        """Drop every materialised expert (pages returned to the OS)."""
        for mm in self._maps:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError):  # pragma: no cover - then memory simply stays
                pass
        self.filled.clear()

    def weights(self, quant: str) -> dict[str, Any]:
        """``ffn.experts.{e}.w1/w3/w2.weight`` views for every expert (no copy)."""
        I, out = self.I, {}
        for e in range(self.E):
            if quant == "w8a8":
                trip = (QuantWeight(self.q_gate_up[e, :I], self.s_gate_up[e, :I]),
                        QuantWeight(self.q_gate_up[e, I:], self.s_gate_up[e, I:]),
                        QuantWeight(self.q_down[e], self.s_down[e]))
            else:
                trip = (self.gate_up[e, :I], self.gate_up[e, I:], self.down[e])
            for n, w in zip(("w1", "w3", "w2"), trip):
                out[f"layers.0.ffn.experts.{e}.{n}.weight"] = w
        return out


class WeightBank:
    """Seeded random weights of one-layer configs, generated once per (name, shape) and
    shared between layer types, quant modes and the transformers layer."""

    def __init__(self, cfg: DeepSeekV4Config, seed: int, quants: list[str]):
        self.cfg, self.seed = cfg, seed
        self._t: dict[tuple, torch.Tensor] = {}
        self._q: dict[tuple, QuantWeight] = {}
        self.experts = ExpertStore(cfg, seed, "w8a8" in quants)

    def layer_weights(self, cfg1: DeepSeekV4Config, quant: str) -> dict[str, Any]:
        """Canonical-name weights of layer 0 of ``cfg1`` (bf16 storage, FP32 where the
        checkpoint keeps FP32); ``quant="w8a8"`` swaps the INT8-ABI tensors for QuantWeights."""
        w: dict[str, Any] = {}
        for name, info in expected_tensors(cfg1).items():
            if not name.startswith("layers.0.") or ".experts." in name:  # routed experts: ExpertStore
                continue
            key = (name, info.shape)
            if key not in self._t:
                self._t[key] = _init_tensor(name, info.shape, cfg1, self.seed)
            t = self._t[key]
            short = name[len("layers.0."):]
            if quant == "w8a8" and short in INT8_NAMES:
                if key not in self._q:
                    self._q[key] = quantize_weight(t)
                t = self._q[key]
            w[name] = t
        w.update(self.experts.weights(quant))
        return w

    def drop_type_specific(self) -> None:
        """Free compressor / indexer tensors (their shapes differ between layer types)."""
        for d in (self._t, self._q):
            for k in [k for k in d if ".compressor." in k[0] or ".indexer." in k[0]]:
                del d[k]

    def resident_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self._t.values())
        n += sum(q.qweight.numel() + 4 * q.scale.numel() for q in self._q.values())
        return n + len(self.experts.filled) * self.experts.bytes_per_expert


# ============================================================================ cache state
def _bf16r(t: torch.Tensor) -> torch.Tensor:
    return t.to(BF16).float()


class CacheState:
    """B sequences at context L for one layer: our SequenceCaches and the equivalent
    transformers cache contents (same random rows), with snapshot / restore."""

    def __init__(self, cfg1: DeepSeekV4Config, lt: str, B: int, S: int, L: int, seed: int,
                 weights_bf16: dict[str, Any]):
        self.cfg, self.lt, self.B, self.S, self.L = cfg1, lt, B, S, L
        g = torch.Generator().manual_seed(_seed(seed, "cache", lt, B, L))
        HD, W = cfg1.head_dim, cfg1.sliding_window
        self.max_seq_len = L + S + 256
        nwin = min(L, W - 1)
        self.hf: dict[str, Any] = {"window": _bf16r(torch.randn(B, nwin, HD, generator=g))}
        self.ours = [SequenceCache.create(cfg1, self.max_seq_len) for _ in range(B)]
        for b, c in enumerate(self.ours):
            c.length = L
            win = c.layers[0].window
            win.rows = self.hf["window"][b].clone()
            win.end = L
        if lt != SLIDING:
            ratio = cfg1.compress_ratio(0)
            self.hf["compressor"] = self._compressor(g, "compressor", ratio, HD, lt == CSA,
                                                     weights_bf16["layers.0.attn.compressor.ape"],
                                                     [c.layers[0].compressor for c in self.ours])
        if lt == CSA:
            self.hf["indexer"] = self._compressor(g, "indexer", cfg1.compress_ratio(0), cfg1.index_head_dim,
                                                  True, weights_bf16["layers.0.attn.indexer.compressor.ape"],
                                                  [c.layers[0].indexer for c in self.ours])
            self._int8_keys([c.layers[0].indexer for c in self.ours])
        self._snap = self._snapshot()

    def _compressor(self, g, name, ratio, d, overlap, ape, states) -> dict[str, Any]:
        L, B = self.L, self.B
        coff = 2 if overlap else 1
        n = L // ratio
        open_rows = L - n * ratio
        entries = _bf16r(torch.randn(B, n, d, generator=g))
        buf_kv = _bf16r(torch.randn(B, open_rows, coff * d, generator=g))
        buf_gate = _bf16r(torch.randn(B, open_rows, coff * d, generator=g))   # raw gate (no ape)
        ov_kv = _bf16r(torch.randn(B, ratio, d, generator=g)) if overlap and n else None
        ov_gate = (_bf16r(torch.randn(B, ratio, d, generator=g)) + ape.float()[:, :d]) if overlap and n else None
        for b, st in enumerate(states):
            st.entries[:n] = entries[b]
            st.n_entries = n
            st.buf_kv = buf_kv[b].clone()
            st.buf_score = buf_gate[b] + ape.float()[:open_rows]             # score = gate + ape[slot]
            if ov_kv is not None:
                st.prev_kv, st.prev_score = ov_kv[b].clone(), ov_gate[b].clone()
        return {"entries": entries, "buf_kv": buf_kv, "buf_gate": buf_gate, "ov_kv": ov_kv, "ov_gate": ov_gate,
                "n": n}

    @staticmethod
    def _int8_keys(states) -> None:
        """W8A8 runtimes cache the indexer keys as INT8 (+ scale); fill them if supported."""
        fn = getattr(REFERENCE_OPS, "indexer_keys_int8", None)
        for st in states:
            if fn is not None and hasattr(st, "store_int8_keys") and st.n_entries:
                st.store_int8_keys(*fn(st.valid_entries()))

    def _objects(self):
        for c in self.ours:
            lc = c.layers[0]
            yield lc.window
            for st in (lc.compressor, lc.indexer):
                if st is not None:
                    yield st

    def _snapshot(self):
        return [(o, dict(o.__dict__)) for o in self._objects()]

    def restore(self) -> None:
        """Undo one step's changes (entries written past ``n_entries`` are simply ignored)."""
        for o, d in self._snap:
            o.__dict__.update(d)

    # ---------------------------------------------------------------- transformers side
    def make_hf_cache(self, hf_cfg):
        from transformers.cache_utils import DynamicCache

        dc = DynamicCache(config=hf_cfg)
        layer = dc.layers[0]
        win = self.hf["window"].to(BF16).unsqueeze(1)                     # [B, 1, nwin, HD]
        layer.lazy_initialization(win, win)
        layer.keys = win
        layer.values = win
        layer.cumulative_length = self.L
        for name in ("compressor", "indexer"):
            h = self.hf.get(name)
            if h is None:
                continue
            layer.compressed_kv[name] = h["entries"].to(BF16)
            layer.entry_count[name] = h["n"]
            layer.buffer_kv[name] = h["buf_kv"].to(BF16)
            layer.buffer_gate[name] = h["buf_gate"].to(BF16)
            if h["ov_kv"] is not None:
                layer.overlap_kv[name] = h["ov_kv"].to(BF16)
                layer.overlap_gate[name] = h["ov_gate"].float()
        snap = {k: (dict(v) if isinstance(v, dict) else v) for k, v in layer.__dict__.items()}

        def restore():
            for k, v in snap.items():
                layer.__dict__[k] = dict(v) if isinstance(v, dict) else v
        return dc, restore


# ============================================================================ transformers layer
_HF_NAMES = {
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}


def hf_config(cfg1: DeepSeekV4Config, experts_impl: str):
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config as HFConfig

    h = HFConfig(**cfg1.to_hf_dict())
    h._attn_implementation = "eager"
    h._experts_implementation = experts_impl
    return h


def build_hf_layer(cfg1: DeepSeekV4Config, weights: dict[str, Any], store: ExpertStore, experts_impl: str):
    """transformers ``DeepseekV4DecoderLayer`` whose parameters are views of ``weights``
    (bf16) and of the expert store (no copies). Returns (layer, hf_config, rotary)."""
    import transformers.models.deepseek_v4.modeling_deepseek_v4 as M

    h = hf_config(cfg1, experts_impl)
    with torch.device("meta"):
        layer = M.DeepseekV4DecoderLayer(h, 0)
    src = {f"layers.0.{v}": k for k, v in _HF_NAMES.items()}
    params = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    for ours_name, hf_name in src.items():
        if hf_name not in params and hf_name not in buffers:
            continue
        t = weights[ours_name]
        mod_name, _, leaf = hf_name.rpartition(".")
        mod = layer.get_submodule(mod_name)
        ref = params.get(hf_name, buffers.get(hf_name))
        if tuple(ref.shape) != tuple(t.shape):
            raise RuntimeError(f"transformers {hf_name} {tuple(ref.shape)} vs ours {ours_name} {tuple(t.shape)}")
        if hf_name in params:
            mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
    layer.mlp.experts._parameters["gate_up_proj"] = torch.nn.Parameter(store.gate_up, requires_grad=False)
    layer.mlp.experts._parameters["down_proj"] = torch.nn.Parameter(store.down, requires_grad=False)
    for mod in list(layer.modules()):  # rotary tables were built on meta: rebuild on CPU
        for cname, child in list(mod.named_children()):
            if isinstance(child, M.DeepseekV4RotaryEmbedding):
                setattr(mod, cname, M.DeepseekV4RotaryEmbedding(h))
    left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"transformers layer tensors not set: {left}")
    layer.eval()
    layer.mlp.experts.register_forward_pre_hook(
        lambda m, args: store.ensure(torch.unique(args[1]).tolist(), "transformers"))
    return layer, h, M.DeepseekV4RotaryEmbedding(h)


def hf_mask(B: int, S: int, L: int, W: int) -> torch.Tensor:
    """Additive sliding-window mask [B, 1, S, nwin + S] (bf16, 0 / finfo.min) for S new
    tokens at positions L … L+S-1 over the cached window rows plus the new rows."""
    nwin = min(L, W - 1)
    kpos = torch.arange(L - nwin, L + S)
    qpos = torch.arange(L, L + S)
    ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
    m = torch.zeros(S, nwin + S, dtype=BF16).masked_fill(~ok, torch.finfo(BF16).min)
    return m.expand(B, 1, S, nwin + S)


# ============================================================================ one measurement
def _ours_fn(cfg1, weights, ops, store, x_hc, ids, positions, offs, state: CacheState, outs, key):
    """Decode step of layer 0 through the runtime engine's sublayer drivers."""
    real_moe = ops.moe

    def moe(x, w, idx, experts, shared, **kw):
        store.ensure(torch.unique(idx).tolist(), key)
        return real_moe(x, w, idx, experts, shared, **kw)

    ops = SimpleNamespace(**{**vars(ops), "moe": moe})
    timer = StageTimer(enabled=True)
    eng = DeepSeekV4Engine(weights, cfg1, dtype=BF16, max_seq_len=state.max_seq_len, ops=ops, timer=timer)
    lw = LayerWeights(weights, 0)
    stage_runs: list[dict[str, float]] = []

    def fn():
        timer.reset()
        h = eng._attention(lw, 0, x_hc, positions, state.ours, offs)
        y = eng._moe(lw, 0, h, ids)
        stage_runs.append(dict(timer.seconds))
        outs[key] = y
    return fn, stage_runs


def _stats(vals: list[float]) -> dict[str, float]:
    r = BenchResult.from_runs(vals)
    return {"median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s}


def _roof(nbytes: float, seconds: float, bw: float) -> tuple[float | None, float | None]:
    if seconds <= 0:
        return None, None
    return nbytes / seconds / 1e9, 100.0 * nbytes / (bw * 1e9) / seconds


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double().flatten(), b.double().flatten()
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_ref": a.abs().max().item(),
            "cosine": (a @ b / (a.norm() * b.norm())).item()}


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc = _offline(args)
    if rc is not None:
        return rc
    if args.plot is not None:  # fail before a long benchmark, not after it
        from llm_kernels.harness.compare_runs import require_matplotlib
        try:
            require_matplotlib()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    try:
        lts = [rf.layer_type_name(t) for t in args.layer_types]
    except ValueError as e:
        print(f"error: --layer-types: {e}", file=sys.stderr)
        return 2
    bad = [q for q in args.quant if q not in QUANT_TO_ROOFLINE]
    if bad or not args.quant:
        print(f"error: --quant must be a list of none, w8a8; got {args.quant}", file=sys.stderr)
        return 2
    S = args.rows_per_seq
    if S <= 0 or any(T % S for T in args.tokens):
        print(f"error: every --tokens value must be a multiple of --rows-per-seq ({S})", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 0 or args.context < 0:
        print("error: --repeats >= 1, --warmup >= 0, --context >= 0 required", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset, n_routed_experts=args.experts)
    L = args.context
    hf_L = args.hf_context if args.hf_context is not None else L
    json_path = args.json or Path(__file__).resolve().parent / "results" / f"bench_{args.preset}.json"

    backends: dict[str, SimpleNamespace] = {}
    backend_status: dict[str, str] = {}
    backend_mods: dict[str, Any] = {}
    for b in args.backends:
        ops, mod, why = resolve_backend(b)
        if ops is None:
            backend_status[b] = f"unavailable: {why}"
            log(f"backend {b}: unavailable ({why})")
        else:
            backends[b] = ops
            backend_mods[b] = mod
            backend_status[b] = "ok"
    if not backends:
        print("error: no usable backend", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    load_before = _loadavg()
    if load_before is not None and load_before > 0.5:
        log(f"warning: 1-minute load average is {load_before:.2f} before the run: other processes compete "
            "for the cores and the timings will be noisy")
    if args.bandwidth:
        bw, bw_src = float(args.bandwidth), "given (--bandwidth)"
    else:
        bw = measure_dram_bandwidth(args.bw_bytes)
        bw_src = f"measured: median of 5 x torch.sum over a {fmt_bytes(args.bw_bytes)} float32 array"
    log(f"DRAM read bandwidth {bw:.1f} GB/s ({bw_src}); torch threads {torch.get_num_threads()}")
    log(f"{cfg.summary()}; context L={L}, rows/seq S={S}, tokens {args.tokens}, layer types "
        f"{[SHORT[t] for t in lts]}, backends {list(backends)}, quant {args.quant}")

    notes = [
        f"T rows = T/{S} sequences x {S} new token(s), every sequence at context {L} (positions L..L+S-1).",
        (f"routed experts: all {cfg.n_routed_experts} routable; an expert's weights are generated when first "
         "routed (warm-up runs), so only routed experts occupy memory."),
        ("per-stage times from the runtime StageTimer; 'other' = step total minus the stages (pool "
         "concatenation, index lists, per-sequence loop)."),
        ("roofline bytes: llm_kernels.harness.roofline (spec §14 kernel ABI for w8a8, all-bf16 for none) with "
         "E_act = experts actually routed in the timed step."),
    ]
    if hf_L != L and args.transformers:
        notes.append(f"transformers measured at context {hf_L} instead of {L} (--hf-context).")

    # memory estimate: dense weights (+ INT8 copies) + routed experts of every T + lm_head
    per_exp = 3 * cfg.moe_intermediate_size * cfg.hidden_size * (2 + (1 if "w8a8" in args.quant else 0))
    est = max(rf.weight_parts(cfg, lt, "bf16")["dense_total"] for lt in lts) * 1.4
    est += min(cfg.n_routed_experts, sum(T * cfg.num_experts_per_tok for T in args.tokens)) * per_exp
    est += cfg.vocab_size * cfg.hidden_size * 2 if args.lm_head else 0
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    log(f"estimated peak memory {fmt_bytes(est)}" + (f" (available {fmt_bytes(avail)})" if avail else ""))
    if avail is not None and est > 0.9 * avail:
        print(f"error: the benchmark needs about {fmt_bytes(est)} but only {fmt_bytes(avail)} is available; "
              "use fewer --tokens or --quant none", file=sys.stderr)
        return 3

    bank = WeightBank(cfg, args.seed, args.quant)
    results: list[dict[str, Any]] = []
    hf_results: list[dict[str, Any]] = []
    speedups: list[dict[str, Any]] = []
    errors: list[str] = []
    stage_rows: list[list[Any]] = []
    total_rows: list[list[Any]] = []

    with torch.inference_mode():
        for lt in lts:
            cfg1 = cfg.replace(num_hidden_layers=1, layer_types=(lt,), mlp_layer_types=("moe",))
            tb = time.perf_counter()
            wts = {q: bank.layer_weights(cfg1, q) for q in args.quant}
            w_bf16 = wts.get("none") or bank.layer_weights(cfg1, "none")
            # a backend module may define prepare_weights(weights, cfg) -> weights (e.g. to pack
            # its INT8 layouts once, outside the timed step); the reference uses them as they are
            bw_wts: dict[tuple[str, str], dict[str, Any]] = {}
            for bname in backends:
                prep = getattr(backend_mods.get(bname), "prepare_weights", None)
                for q in args.quant:
                    bw_wts[(bname, q)] = prep(wts[q], cfg1) if prep is not None else wts[q]
            hf = None
            if args.transformers:
                try:
                    hf = build_hf_layer(cfg1, w_bf16, bank.experts, args.hf_experts_impl)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{SHORT[lt]}: transformers layer: {type(e).__name__}: {e}")
                    log(f"  transformers layer unavailable: {e}")
            log(f"[{SHORT[lt]}] weights ready in {time.perf_counter() - tb:.1f} s")
            for T in args.tokens:
                B = T // S
                g = torch.Generator().manual_seed(_seed(args.seed, "input", lt, T))
                x_hc = _bf16r(torch.randn(T, cfg.hc_mult, cfg.hidden_size, generator=g))
                ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
                positions = torch.arange(L, L + S).repeat(B)
                offs = [i * S for i in range(B + 1)]
                state = CacheState(cfg1, lt, B, S, L, args.seed, w_bf16)
                bank.experts.routed.clear()
                fns: dict[str, Callable] = {}
                setups: dict[str, Callable] = {}
                stage_log: dict[str, list] = {}
                outs: dict[str, torch.Tensor] = {}
                for bname, ops in backends.items():
                    for q in args.quant:
                        key = f"{bname}/{q}"
                        fn, sl = _ours_fn(cfg1, bw_wts[(bname, q)], ops, bank.experts, x_hc, ids, positions, offs,
                                          state, outs, key)
                        fns[key], setups[key], stage_log[key] = fn, state.restore, sl
                hf_state = None
                if hf is not None:
                    layer, hcfg, rotary = hf
                    st_hf = state if hf_L == L else CacheState(cfg1, lt, B, S, hf_L, args.seed, w_bf16)
                    dc, restore = st_hf.make_hf_cache(hcfg)
                    hpos = torch.arange(hf_L, hf_L + S).expand(B, S)
                    xh = x_hc.view(B, S, cfg.hc_mult, cfg.hidden_size).to(BF16)
                    mask = hf_mask(B, S, hf_L, cfg.sliding_window)
                    hids = ids.view(B, S)

                    def hf_fn(layer=layer, rotary=rotary, dc=dc, hpos=hpos, xh=xh, mask=mask, hids=hids, outs=outs):
                        pe = {p: rotary(xh, position_ids=hpos, layer_type=p) for p in ("main", "compress")}
                        outs["transformers"] = layer(xh, position_embeddings=pe, position_ids=hpos,
                                                     attention_mask=mask, input_ids=hids, past_key_values=dc)
                    fns["transformers"], setups["transformers"] = hf_fn, restore
                    hf_state = st_hf
                # first run of each variant alone (counts as warm-up; materialises the routed
                # experts; a failing variant is reported and dropped), then round-robin timing
                for key in list(fns):
                    try:
                        setups[key]()
                        fns[key]()
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"{SHORT[lt]} T={T} {key}: {type(e).__name__}: {e}")
                        log(f"  {key} failed: {type(e).__name__}: {e}")
                        del fns[key]
                n_before = len(bank.experts.filled)
                timed: dict[str, BenchResult] = {}
                if fns:
                    timed = interleaved(fns, repeats=args.repeats, warmup=max(args.warmup - 1, 0), setups=setups)
                fills_in_timed = len(bank.experts.filled) - n_before
                ref_out = outs.get("reference/none")
                for key, res in timed.items():
                    if key == "transformers":
                        continue
                    bname, q = key.split("/")
                    rq = QUANT_TO_ROOFLINE[q]
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
                                         "gbs": gbs, "roofline_pct": pct,
                                         "roofline_s": rf.roofline_seconds(nbytes, bw)}
                        stage_rows.append([SHORT[lt], key, T, sname, st["median_s"] * 1e3, fmt_bytes(nbytes),
                                           gbs, pct])
                    other = [res.runs[i] - sum(r.values()) for i, r in enumerate(runs)] if len(runs) == len(
                        res.runs) else []
                    if other:
                        stages["other"] = {**_stats(other), "runs": other}
                        stage_rows.append([SHORT[lt], key, T, "other", stages["other"]["median_s"] * 1e3, "-",
                                           None, None])
                    lbytes = sum(v.total for v in bd.values())
                    gbs, pct = _roof(lbytes, res.median_s, bw)
                    stage_rows.append([SHORT[lt], key, T, "LAYER TOTAL", res.median_s * 1e3, fmt_bytes(lbytes),
                                       gbs, pct])
                    entry = {"layer_type": SHORT[lt], "T": T, "sequences": B, "rows_per_seq": S, "context": L,
                             "backend": bname, "quant": q, "total": res.to_dict(), "layer_bytes": lbytes,
                             "layer_bytes_default_experts": rf.layer_bytes(cfg, lt, T, L, rq, rows_per_seq=S),
                             "gbs": gbs, "roofline_pct": pct, "roofline_s": rf.roofline_seconds(lbytes, bw),
                             "experts_routed": routed, "experts_created_during_timing": fills_in_timed,
                             "weights_cold": lbytes >= 4 * L3_BYTES, "stages": stages}
                    if ref_out is not None and key != "reference/none" and key in outs:
                        entry["vs_reference_none"] = _compare(ref_out, outs[key])
                    results.append(entry)
                    total_rows.append([SHORT[lt], T, key, res.median_s * 1e3, fmt_bytes(lbytes), gbs, pct])
                if "transformers" in timed:
                    res = timed["transformers"]
                    routed = bank.experts.routed.get("transformers", 0)
                    lbytes = rf.layer_bytes(cfg, lt, T, hf_L, "bf16", rows_per_seq=S, experts_active=routed)
                    gbs, pct = _roof(lbytes, res.median_s, bw)
                    hentry = {"layer_type": SHORT[lt], "T": T, "sequences": B, "rows_per_seq": S, "context": hf_L,
                              "dtype": "bf16", "experts_implementation": args.hf_experts_impl,
                              "total": res.to_dict(), "layer_bytes": lbytes, "gbs": gbs, "roofline_pct": pct}
                    if ref_out is not None and hf_L == L:
                        hentry["vs_reference_none"] = _compare(ref_out, outs["transformers"].float().reshape(
                            ref_out.shape))
                    hf_results.append(hentry)
                    total_rows.append([SHORT[lt], T, "transformers/bf16" + (f" (L={hf_L})" if hf_L != L else ""),
                                       res.median_s * 1e3, fmt_bytes(lbytes), gbs, pct])
                    for key, r in timed.items():
                        if key != "transformers":
                            speedups.append({"layer_type": SHORT[lt], "T": T, "ours": key, "baseline": "transformers/bf16",
                                             "speedup": res.median_s / r.median_s, "same_context": hf_L == L})
                for q in args.quant:
                    a, b_ = timed.get(f"reference/{q}"), timed.get(f"fused/{q}")
                    if a is not None and b_ is not None:
                        speedups.append({"layer_type": SHORT[lt], "T": T, "ours": f"fused/{q}",
                                         "baseline": f"reference/{q}", "speedup": a.median_s / b_.median_s,
                                         "same_context": True})
                log(f"[{SHORT[lt]}] T={T}: " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items())
                    + f"; routed experts {sorted(set(bank.experts.routed.values()))}, resident "
                    f"{fmt_bytes(bank.resident_bytes())}")
                del state, hf_state, fns, setups, outs
                gc.collect()
            del wts, bw_wts, w_bf16, hf
            bank.drop_type_specific()
            bank.experts.release()
            gc.collect()

        lm_results = _bench_lm_head(cfg, backends, args, bw, log) if args.lm_head else []

    print()
    print_table(stage_rows, ["layer", "variant", "T", "stage", "ms (median)", "bytes", "GB/s", "% roofline"],
                title=f"Per-stage decode step, {args.preset}, context {L}, DRAM {bw:.1f} GB/s, median of "
                      f"{args.repeats}")
    print()
    print_table(total_rows, ["layer", "T", "variant", "ms (median)", "bytes", "GB/s", "% roofline"],
                title="Layer totals (attention + MoE sublayers)")
    if speedups:
        print()
        print_table([[s["layer_type"], s["T"], s["ours"], s["baseline"], s["speedup"]] for s in speedups],
                    ["layer", "T", "ours", "baseline", "speed-up (x)"], title="Speed-ups (baseline time / ours)")
    if lm_results:
        print()
        print_table([[r["backend"], r["T"], r["total"]["median_s"] * 1e3, fmt_bytes(r["bytes"]), r["gbs"],
                      r["roofline_pct"]] for r in lm_results],
                    ["backend", "T", "ms (median)", "bytes", "GB/s", "% roofline"], title="LM head (once per step)")
    for b, s in backend_status.items():
        if s != "ok":
            print(f"\nbackend {b}: {s}")
    for e in errors:
        print(f"error: {e}")

    bw_end = None if args.bandwidth else measure_dram_bandwidth(args.bw_bytes)
    if bw_end is not None:
        log(f"DRAM read bandwidth at the end: {bw_end:.1f} GB/s (start {bw:.1f}; % roofline uses the start)")
    data = {
        "benchmark": "bench_layer",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "preset": args.preset,
        "config": {"summary": cfg.summary(), "hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
                   "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
                   "num_attention_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
                   "sliding_window": cfg.sliding_window, "index_topk": cfg.index_topk},
        "tokens": args.tokens, "context": L, "rows_per_seq": S, "layer_types": [SHORT[t] for t in lts],
        "quant": args.quant, "repeats": args.repeats, "warmup": args.warmup,
        "bandwidth_gbs": bw, "bandwidth_source": bw_src, "bandwidth_gbs_end": bw_end,
        "backends": backend_status, "notes": notes, "errors": errors,
        "results": results, "transformers": hf_results, "speedups": speedups, "lm_head": lm_results,
        "wall_s": time.perf_counter() - t0,
        "loadavg_1m_before": load_before, "loadavg_1m_after": _loadavg(),
    }
    path = write_results(json_path, data, machine=machine_info(bw, bw_src))
    log(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.plot is not None:
        from llm_kernels.harness.compare_runs import plot_results
        log(f"wrote {plot_results(data, args.plot)}")
    return 0 if not errors else 1


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _bench_lm_head(cfg, backends, args, bw, log) -> list[dict[str, Any]]:
    """hc_head -> final RMSNorm -> BF16 LM head, per backend and T (weights >> L3 for real
    presets, so every call streams the head from DRAM)."""
    D, HC, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    g = torch.Generator().manual_seed(_seed(args.seed, "lm_head"))
    head = torch.empty(V, D, dtype=BF16).normal_(0.0, 1.0 / math.sqrt(D), generator=g)
    hc_fn = torch.empty(HC, HC * D).normal_(0.0, 1.0 / math.sqrt(HC * D), generator=g)
    hc_base = torch.empty(HC).normal_(0.0, 0.5, generator=g)
    hc_scale = torch.empty(1).uniform_(0.5, 1.5, generator=g)
    norm = torch.empty(D).normal_(1.0, 0.1, generator=g)
    out = []
    for T in args.tokens:
        x = _bf16r(torch.randn(T, HC, D, generator=g))
        fns = {}
        for bname, ops in backends.items():
            def fn(ops=ops, x=x):
                y = ops.hc_head(x, hc_fn, hc_scale, hc_base, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps, dtype=BF16)
                y = ops.rms_norm(y, norm, cfg.rms_norm_eps, BF16)
                return ops.linear(y, head, BF16)
            fns[bname] = fn
        timed = interleaved(fns, repeats=args.repeats, warmup=args.warmup)
        nbytes = rf.lm_head_bytes(cfg, T)
        for bname, res in timed.items():
            gbs, pct = _roof(nbytes, res.median_s, bw)
            out.append({"backend": bname, "T": T, "total": res.to_dict(), "bytes": nbytes, "gbs": gbs,
                        "roofline_pct": pct, "weights_cold": nbytes >= 4 * L3_BYTES})
        log(f"[lm_head] T={T}: " + ", ".join(f"{k} {v.median_s * 1e3:.1f} ms" for k, v in timed.items()))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
