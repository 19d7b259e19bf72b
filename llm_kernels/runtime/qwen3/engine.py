"""Prefill / decode step driver for Qwen3 over a paged KV cache, for a batch of sequences
of different lengths.

The new tokens of all sequences in a step are packed into one [ΣT] row axis. Per layer
the stages run in order (names shared by the reference and the fused kernels):

``input_norm_qkv`` -> ``qk_norm_rope`` (q/k norm, RoPE, K/V written to their cache slots:
``qk_norm_rope_cache``) -> ``attention`` (``paged_attention``: row t sees the first
``position_t + 1`` tokens of its sequence) -> ``o_proj_residual_norm`` ->
``gate_up_swiglu`` -> ``down_residual``; then ``lm_head`` (final norm + head).

Stage functions come from an ``ops`` namespace (:mod:`.stages`: ``REFERENCE_OPS``, the
torch reference, or ``FUSED_OPS``). Sequence bookkeeping, validation and logits rows are
the shared :class:`~llm_kernels.runtime.engine_core.EngineCore`'s.
Source: transformers ``Qwen3ForCausalLM`` with a ``DynamicCache``, vLLM-style paging.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import torch

from ...errors import CacheOverflowError
from ...models.qwen3.config import Qwen3Config
from ...reference.qwen3 import model as _model
from ..engine_core import DEFAULT_PREFILL_CHUNK, EngineCore
from ..paged_cache import PagedKVCache
from ..timing import StageTimer
from .stages import REFERENCE_OPS, STAGES

__all__ = ["Qwen3Engine", "CacheOverflowError", "STAGES"]


class Qwen3Engine(EngineCore):
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
        layers: ``(first, stop)``: this pipeline stage's decoder layers (``weights`` need hold
            only those, plus the embedding on the first stage and the head on the last); its
            ``pipe`` link is set by :mod:`llm_kernels.distributed`. Default: every layer.
        consume_weights: let ``prepare_weights`` replace the entries of ``weights`` by their
            packed forms as it goes (each raw INT8 tensor freed once packed).
        prefill_chunk: rows per sub-step of a long step (see ``EngineCore.step``; 0 / None:
            no chunking).

    Raises ValueError for a bad dtype, cache geometry or ``prefill_chunk``."""

    def __init__(self, weights: dict, cfg: Qwen3Config, dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 4096, max_batch: int = 8, block_size: int = 16,
                 num_blocks: int | None = None, ops: SimpleNamespace = REFERENCE_OPS,
                 timer: StageTimer | None = None, num_layers: int | None = None,
                 consume_weights: bool = False, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 layers: tuple[int, int] | None = None):
        super().__init__(cfg, dtype, timer, prefill_chunk=prefill_chunk)
        self.ops = ops
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        first, stop = (0, self.num_layers) if layers is None else layers
        if not 0 <= first < stop <= cfg.num_hidden_layers or (layers is not None and num_layers is not None):
            raise ValueError(f"layers must be (first, stop) with 0 <= first < stop <= num_hidden_layers="
                             f"{cfg.num_hidden_layers} (and no num_layers), got {layers}")
        self.layer_ids = range(first, stop)
        if num_blocks is None:
            num_blocks = max_batch * math.ceil(max_seq_len / block_size)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype, max_seq_len, stop - first)
        self.w = ops.prepare_weights(weights, cfg, consume=consume_weights)  # load-time kernel form
        self.layers = [_model.LayerWeights.from_weights(self.w, i) for i in self.layer_ids]

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    # ------------------------------------------------------------------ EngineCore hooks
    def _new_sequence(self, sid: int) -> None:
        self.cache.add_sequence(sid)

    def _drop_sequence(self, sid: int) -> None:
        self.cache.release(sid)

    def _length(self, sid: int) -> int:
        return self.cache.lengths[sid]

    def _reserve(self, seq_ids: Sequence[int], lens: Sequence[int]) -> torch.Tensor:
        return self.cache.reserve(seq_ids, lens)  # the cache slots of the new rows

    def _rollback(self, seq_ids: Sequence[int], lens: Sequence[int], slots: torch.Tensor) -> None:
        self.cache.rollback(seq_ids, lens)

    def _check_room(self, seq_ids: Sequence[int], starts: Sequence[int], lens: Sequence[int]) -> None:
        self.cache.check_room(seq_ids, lens)  # max_seq_len and the free pages, for the whole step

    def _save_state(self, seq_ids: Sequence[int]) -> dict[int, int]:
        # a sequence's cache is its length and pages: rows past the length are never read
        return {s: self.cache.lengths[s] for s in seq_ids}

    def _restore_state(self, seq_ids: Sequence[int], saved: dict[int, int]) -> None:
        self.cache.rollback(seq_ids, [self.cache.lengths[s] - saved[s] for s in seq_ids])

    def _forward(self, ids, seq_ids, starts, lens, slots) -> torch.Tensor:
        return self.forward_rows(ids, seq_ids, starts, lens, slots)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.logits_head(self.w, self.cfg, x, self.dtype)

    def forward_rows(self, ids: torch.Tensor | None, seq_ids: Sequence[int], starts: Sequence[int],
                     lens: Sequence[int], slots: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder layers for rows already reserved in the cache. ``x`` [ΣT, hidden]
        replaces the embedding of ``ids`` when given (layer benchmarks). Returns [ΣT, hidden]."""
        cfg, dt, ops, tm, cache = self.cfg, self.dtype, self.ops, self.timer, self.cache
        with tm("kv_cache"):  # row -> sequence / context / page tables of this step
            positions = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, lens)])
            seq_idx = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32),
                                              torch.tensor(lens))
            ctx = (positions + 1).to(torch.int32)
            tables = cache.block_table(seq_ids)
        pipe = self.pipe
        if x is None and pipe is not None and not pipe.is_first:
            with tm("pipeline"):
                # a layer hands the residual stream on in float32 (values rounded to the dtype)
                x = pipe.recv_hidden((int(positions.numel()), cfg.hidden_size), torch.float32)
        elif x is None:
            with tm("embed"):
                x = ops.embed(self.w, ids, dt)
        with tm("rope_cos_sin"):
            cos, sin = ops.rope_cos_sin(cfg.rope, cfg.head_dim, positions, dt)
        eps = cfg.rms_norm_eps
        for j, (i, lw) in enumerate(zip(self.layer_ids, self.layers)):  # j: the cache's layer slot
            with tm.layer(i, "full_attention"):
                with tm("input_norm_qkv"):
                    q, k, v = ops.input_norm_qkv(x, lw.input_layernorm, lw.q_proj, lw.k_proj, lw.v_proj, eps, dt)
                with tm("qk_norm_rope"):
                    qh = ops.qk_norm_rope_cache(q, k, v, lw.q_norm, lw.k_norm, cos, sin, eps, dt,
                                                cache.k[j], cache.v[j], slots)
                with tm("attention"):
                    a = ops.paged_attention(qh, cache.k[j], cache.v[j], tables, seq_idx, ctx,
                                            cfg.softmax_scale, dt)
                with tm("o_proj_residual_norm"):
                    h, hn = ops.o_proj_residual_norm(a, lw.o_proj, x, lw.post_attention_layernorm, eps, dt)
                with tm("gate_up_swiglu"):
                    act = ops.gate_up_swiglu(hn, lw.gate_proj, lw.up_proj, dt)
                with tm("down_residual"):
                    x = ops.down_residual(act, lw.down_proj, h, dt)
        if pipe is not None and not pipe.is_last:
            with tm("pipeline"):
                pipe.send_hidden(x, torch.float32)
        return x
