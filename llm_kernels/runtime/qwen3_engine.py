"""Prefill / decode step driver for Qwen3 over a paged KV cache, for a batch of sequences
of different lengths.

The new tokens of all sequences in a step are packed into one [ΣT] row axis. Per layer
the stages run in order (names shared by the reference and the fused kernels):

``input_norm_qkv`` -> ``qk_norm_rope`` (q/k norm, RoPE, K/V written to their cache slots:
``qk_norm_rope_cache``) -> ``attention`` (``paged_attention``: row t sees the first
``position_t + 1`` tokens of its sequence) -> ``o_proj_residual_norm`` ->
``gate_up_swiglu`` -> ``down_residual``; then ``lm_head`` (final norm + head).

Stage functions come from an ``ops`` namespace (default :data:`REFERENCE_OPS`, the torch
reference); :func:`llm_kernels.runtime.backends.get_ops` gives the fused one.
Source: transformers ``Qwen3ForCausalLM`` with a ``DynamicCache``, vLLM-style paging.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import torch

from ..config_qwen3 import Qwen3Config
from ..reference.qwen3 import model as _model
from ..reference.qwen3 import paged as _paged
from ..reference.qwen3.common import rope_cos_sin
from ..reference.qwen3.mlp import down_residual, gate_up_swiglu
from ..reference.qwen3.o_proj import o_proj_residual_norm
from ..reference.qwen3.qkv_proj import input_norm_qkv
from .cache import CacheOverflowError
from .paged_cache import PagedKVCache
from .timing import StageTimer

__all__ = ["REFERENCE_OPS", "Qwen3Engine", "CacheOverflowError", "STAGES"]

REFERENCE_OPS = SimpleNamespace(
    embed=_model.embed, rope_cos_sin=rope_cos_sin, input_norm_qkv=input_norm_qkv,
    qk_norm_rope_cache=_paged.qk_norm_rope_cache, paged_attention=_paged.paged_attention,
    o_proj_residual_norm=o_proj_residual_norm, gate_up_swiglu=gate_up_swiglu,
    down_residual=down_residual, logits_head=_model.logits_head,
)

# timed stage names of one layer, in order (the benchmark's rows)
STAGES = ("input_norm_qkv", "qk_norm_rope", "attention", "o_proj_residual_norm", "gate_up_swiglu",
          "down_residual")


class Qwen3Engine:
    """Runs Qwen3 incrementally over a :class:`PagedKVCache`.

    Args:
        weights: ``load_checkpoint`` tensors (transformers names; QuantWeight for W8A8).
        cfg: the Qwen3 config.
        dtype: activation dtype, torch.float32 or torch.bfloat16 (the KV cache uses it too).
        max_seq_len: tokens per sequence (<= cfg.max_position_embeddings).
        max_batch: sequences the default page pool is sized for (``num_blocks`` default =
            ``max_batch · ceil(max_seq_len / block_size)``).
        block_size, num_blocks: page geometry (see PagedKVCache).
        ops: stage implementations (default :data:`REFERENCE_OPS`).
        timer: optional StageTimer.
        num_layers: run only the first N layers (benchmarks); default all.

    Raises ValueError for a bad dtype or cache geometry."""

    def __init__(self, weights: dict, cfg: Qwen3Config, dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 4096, max_batch: int = 8, block_size: int = 16,
                 num_blocks: int | None = None, ops: SimpleNamespace = REFERENCE_OPS,
                 timer: StageTimer | None = None, num_layers: int | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.w, self.cfg, self.dtype, self.ops = weights, cfg, dtype, ops
        self.timer = timer or StageTimer(enabled=False)
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if num_blocks is None:
            num_blocks = max_batch * math.ceil(max_seq_len / block_size)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype, max_seq_len, self.num_layers)
        self.layers = [_model.LayerWeights.from_weights(weights, i) for i in range(self.num_layers)]
        self._next_id = 0

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.cache.add_sequence(sid)
        return sid

    def release(self, seq_id: int) -> None:
        self.cache.release(seq_id)

    def length(self, seq_id: int) -> int:
        return self.cache.lengths[seq_id]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[torch.Tensor]]:
        """New sequences from ``prompts`` (one batch step); returns (seq_ids, logits
        [len(prompt), V] each). A failed prefill registers nothing."""
        ids = [self.add_sequence() for _ in prompts]
        try:
            return ids, self.step(ids, prompts)
        except Exception:
            for sid in ids:
                self.cache.release(sid)
            raise

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int | Sequence[int]]) -> list[torch.Tensor]:
        """Feed one token (or a few) per sequence; returns logits [n, V] per sequence."""
        toks = [[t] if isinstance(t, int) else list(t) for t in tokens]
        return self.step(seq_ids, toks)

    # ------------------------------------------------------------------ one step
    def step(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]],
             logits_rows: str = "all") -> list[torch.Tensor]:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]`` and return float32 logits of the
        new tokens, [len(tokens[b]), V] each (``"last"``: [1, V]).

        Raises KeyError for an unknown id; ValueError for mismatched lists, an empty
        token list, a repeated sequence or an out-of-vocabulary id; CacheOverflowError when
        a sequence passes max_seq_len or the page pool is full. On error no cache changes."""
        cfg = self.cfg
        if len(seq_ids) != len(tokens):
            raise ValueError(f"{len(seq_ids)} sequence ids but {len(tokens)} token lists")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence may appear once per step, got {list(seq_ids)}")
        lens = [len(t) for t in tokens]
        for s, n in zip(seq_ids, lens):
            if n == 0:
                raise ValueError(f"sequence {s}: empty token list")
        ids = torch.tensor([int(t) for ts in tokens for t in ts], dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        starts = [self.cache.lengths[s] if s in self.cache.lengths else None for s in seq_ids]
        if None in starts:
            raise KeyError(f"unknown sequence id {seq_ids[starts.index(None)]}")
        slots = self.cache.reserve(seq_ids, lens)
        try:
            x = self.forward_rows(ids, seq_ids, starts, lens, slots)
            return self._logits(x, lens, logits_rows)
        except Exception:
            self.cache.rollback(seq_ids, lens)
            raise

    def forward_rows(self, ids: torch.Tensor | None, seq_ids: Sequence[int], starts: Sequence[int],
                     lens: Sequence[int], slots: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder layers for rows already reserved in the cache. ``x`` [ΣT, hidden]
        replaces the embedding of ``ids`` when given (layer benchmarks). Returns [ΣT, hidden]."""
        cfg, dt, ops, tm, cache = self.cfg, self.dtype, self.ops, self.timer, self.cache
        positions = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, lens)])
        seq_idx = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32),
                                          torch.tensor(lens))
        ctx = (positions + 1).to(torch.int32)
        tables = cache.block_table(seq_ids)
        if x is None:
            with tm("embed"):
                x = ops.embed(self.w, ids, dt)
        with tm("rope_cos_sin"):
            cos, sin = ops.rope_cos_sin(cfg.rope, cfg.head_dim, positions, dt)
        eps = cfg.rms_norm_eps
        for i, lw in enumerate(self.layers):
            with tm.layer(i, "full_attention"):
                with tm("input_norm_qkv"):
                    q, k, v = ops.input_norm_qkv(x, lw.input_layernorm, lw.q_proj, lw.k_proj, lw.v_proj, eps, dt)
                with tm("qk_norm_rope"):
                    qh = ops.qk_norm_rope_cache(q, k, v, lw.q_norm, lw.k_norm, cos, sin, eps, dt,
                                                cache.k[i], cache.v[i], slots)
                with tm("attention"):
                    a = ops.paged_attention(qh, cache.k[i], cache.v[i], tables, seq_idx, ctx,
                                            cfg.softmax_scale, dt)
                with tm("o_proj_residual_norm"):
                    h, hn = ops.o_proj_residual_norm(a, lw.o_proj, x, lw.post_attention_layernorm, eps, dt)
                with tm("gate_up_swiglu"):
                    act = ops.gate_up_swiglu(hn, lw.gate_proj, lw.up_proj, dt)
                with tm("down_residual"):
                    x = ops.down_residual(act, lw.down_proj, h, dt)
        return x

    def _logits(self, x: torch.Tensor, lens: Sequence[int], logits_rows: str) -> list[torch.Tensor]:
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        if logits_rows == "last":
            x = x[torch.tensor([o - 1 for o in offs[1:]])]
            offs = list(range(len(lens) + 1))
        elif logits_rows != "all":
            raise ValueError(f"logits_rows must be 'all' or 'last', got {logits_rows!r}")
        with self.timer("lm_head"):
            logits = self.ops.logits_head(self.w, self.cfg, x, self.dtype)
        return [logits[offs[b]:offs[b + 1]] for b in range(len(lens))]
