"""Qwen3 layer benchmark state: seeded random bf16 weights of layer 0 (transformers names,
``write_random_checkpoint``'s Qwen3 scales; the 7 projections INT8 for W8A8), transformers'
``Qwen3DecoderLayer`` on the same tensors, and :class:`KVState`: B sequences at context L
in our paged KV cache and in transformers' dense cache (same random rows)."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable

import torch

from ...models.qwen3 import roofline as rq
from ...models.qwen3.config import Qwen3Config
from ...numerics.quant import quantize_weight
from ...runtime.paged_cache import PagedKVCache
from ..core import fmt_bytes

__all__ = ["KVState", "build_hf_layer", "build_weights", "quantize_layer", "seed_of", "PREFIX"]

BF16 = torch.bfloat16
PREFIX = "model.layers.0."


def seed_of(seed: int, *parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def build_weights(cfg: Qwen3Config, seed: int, log: Callable[..., None] = print) -> dict[str, torch.Tensor]:
    """Layer-0 tensors ``model.layers.0.*`` (transformers names), bf16, seeded per name:
    2-D [out, in] ~ N(0, 1/sqrt(in)); norm vectors [n] ~ 1 + N(0, 0.1) (writer.py's Qwen3 rules)."""
    w: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    table = rq.weight_table(cfg, "bf16")
    total = sum(t.nbytes for t in table)
    done = 0
    for i, t in enumerate(table):
        g = torch.Generator().manual_seed(seed_of(seed, t.name, t.shape))
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


# ---------------------------------------------------------------------------- transformers
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


# ---------------------------------------------------------------------------- cache state
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
            g = torch.Generator().manual_seed(seed_of(seed, "kv", b, L))
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
