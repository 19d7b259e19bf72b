"""DeepSeek-V4 layer benchmark state: seeded random weights of one decoder layer (routed
experts materialised on first routing in lazily committed memory maps) and a cache state
of B sequences at context L, for our :class:`SequenceCache` s and transformers'
``DynamicCache`` (same rows), with snapshot / restore.
"""

from __future__ import annotations

import hashlib
import math
import mmap
from typing import Any

import torch

from ...checkpoint.names import expected_tensors
from ...models.deepseek_v4.config import CSA, SLIDING, DeepSeekV4Config
from ...models.deepseek_v4.weights import is_fp32_tensor
from ...numerics.quant import QuantWeight, quantize_weight
from ...runtime.deepseek_v4.cache import SequenceCache
from ...runtime.deepseek_v4.stages import REFERENCE_OPS

__all__ = ["ExpertStore", "WeightBank", "CacheState", "lazy_empty", "seed_of", "bf16r", "INT8_NAMES"]

BF16 = torch.bfloat16
# Tensors stored INT8 (+ per-row scale) in the W8A8 kernel ABI (spec §14); experts separately.
INT8_NAMES = ("attn.wq_b.weight", "attn.wo_b.weight", "attn.indexer.wq_b.weight",
              "ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight", "ffn.shared_experts.w2.weight")


def seed_of(seed: int, *parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _init_tensor(name: str, shape: tuple[int, ...], cfg: DeepSeekV4Config, seed: int) -> torch.Tensor:
    """Seeded random tensor at the init scales of ``write_random_checkpoint`` (activations
    O(1)), generated directly in its storage dtype (FP32 suffixes float32, else bf16)."""
    g = torch.Generator().manual_seed(seed_of(seed, name, shape))
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
        g = torch.Generator().manual_seed(seed_of(self.seed, "expert", e))
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
def bf16r(t: torch.Tensor) -> torch.Tensor:
    return t.to(BF16).float()


class CacheState:
    """B sequences at context L for one layer: our SequenceCaches and the equivalent
    transformers cache contents (same random rows), with snapshot / restore."""

    def __init__(self, cfg1: DeepSeekV4Config, lt: str, B: int, S: int, L: int, seed: int,
                 weights_bf16: dict[str, Any]):
        self.cfg, self.lt, self.B, self.S, self.L = cfg1, lt, B, S, L
        g = torch.Generator().manual_seed(seed_of(seed, "cache", lt, B, L))
        HD, W = cfg1.head_dim, cfg1.sliding_window
        self.max_seq_len = L + S + 256
        nwin = min(L, W - 1)
        self.hf: dict[str, Any] = {"window": bf16r(torch.randn(B, nwin, HD, generator=g))}
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
        entries = bf16r(torch.randn(B, n, d, generator=g))
        buf_kv = bf16r(torch.randn(B, open_rows, coff * d, generator=g))
        buf_gate = bf16r(torch.randn(B, open_rows, coff * d, generator=g))   # raw gate (no ape)
        ov_kv = bf16r(torch.randn(B, ratio, d, generator=g)) if overlap and n else None
        ov_gate = (bf16r(torch.randn(B, ratio, d, generator=g)) + ape.float()[:, :d]) if overlap and n else None
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
