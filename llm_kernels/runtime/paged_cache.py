"""Paged KV cache for Qwen3: fixed-size pages ("blocks") shared by a batch of sequences.

Layout, per layer: ``k[layer]``, ``v[layer]`` torch tensors ``[num_blocks, num_key_value_heads,
block_size, head_dim]`` in the cache dtype (float32 for fp32 runs, bfloat16 otherwise). A
sequence owns an ordered list of block ids (its row of the block table); token position p of
the sequence lives in block ``table[p // block_size]``, row ``p % block_size`` — its *slot*
is ``block_id * block_size + p % block_size``. K is stored after q/k-norm and RoPE, V raw,
exactly what attention reads (vLLM's PagedAttention layout, heads before rows so one head's
rows of a page are contiguous).

Capacity: a sequence may hold at most ``max_seq_len`` tokens, and all sequences together at
most ``num_blocks`` pages. :meth:`PagedKVCache.reserve` checks every sequence of a step
before allocating anything and raises :class:`~llm_kernels.runtime.cache.CacheOverflowError`
naming the sequence, its length and the limit; nothing is truncated or evicted.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import CacheOverflowError
from ..models.qwen3.config import Qwen3Config

__all__ = ["PagedKVCache", "CacheOverflowError"]


class PagedKVCache:
    """Block-paged K/V storage for ``cfg.num_hidden_layers`` layers.

    Args:
        cfg: the Qwen3 config (layers, kv heads, head_dim).
        num_blocks: pages in the pool (shared by all sequences).
        block_size: tokens per page.
        dtype: torch.float32 or torch.bfloat16 (storage dtype).
        max_seq_len: per-sequence token limit (default ``cfg.max_position_embeddings``).
        num_layers: allocate only this many layers (benchmarks of one layer); default all.

    Raises ValueError for non-positive sizes or another dtype."""

    def __init__(self, cfg: Qwen3Config, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, max_seq_len: int | None = None,
                 num_layers: int | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"KV cache dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.cfg, self.num_blocks, self.block_size, self.dtype = cfg, num_blocks, block_size, dtype
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        nl = cfg.num_hidden_layers if num_layers is None else num_layers
        shape = (num_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(nl)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(nl)]
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    # ------------------------------------------------------------------ sequences
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        """Bytes of K and V storage over all allocated layers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def add_sequence(self, seq_id: int) -> None:
        """Register an empty sequence. Raises ValueError if the id exists."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already exists in the KV cache")
        self.tables[seq_id] = []
        self.lengths[seq_id] = 0

    def release(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool. Raises KeyError for an unknown id."""
        blocks = self.tables.pop(seq_id)
        del self.lengths[seq_id]
        self._free.extend(reversed(blocks))

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        have = len(self.tables[seq_id])
        return max(0, math.ceil((self.lengths[seq_id] + n_new) / self.block_size) - have)

    def check_room(self, seq_ids: Sequence[int], n_new: Sequence[int]) -> None:
        """Raise CacheOverflowError if appending ``n_new[i]`` tokens to ``seq_ids[i]`` (all
        of them together) would pass ``max_seq_len`` or the free pages. KeyError for an
        unknown sequence."""
        need = 0
        for s, n in zip(seq_ids, n_new):
            if s not in self.tables:
                raise KeyError(f"unknown sequence id {s}")
            if self.lengths[s] + n > self.max_seq_len:
                raise CacheOverflowError(
                    f"sequence {s} of {self.lengths[s]} tokens cannot take {n} more: the KV cache holds "
                    f"at most max_seq_len={self.max_seq_len} tokens per sequence")
            need += self.blocks_needed(s, n)
        if need > len(self._free):
            raise CacheOverflowError(
                f"this step needs {need} more KV pages of {self.block_size} tokens but only "
                f"{len(self._free)} of {self.num_blocks} are free; release sequences or create the "
                "cache with more num_blocks")

    def reserve(self, seq_ids: Sequence[int], n_new: Sequence[int]) -> torch.Tensor:
        """Allocate room for ``n_new[i]`` more tokens of each sequence and advance their
        lengths. Returns the slots int64 [Σ n_new] in row order (sequence by sequence).
        Checks everything first (:meth:`check_room`); on error nothing changes."""
        self.check_room(seq_ids, n_new)
        slots = []
        for s, n in zip(seq_ids, n_new):
            table = self.tables[s]
            for _ in range(self.blocks_needed(s, n)):
                table.append(self._free.pop())
            pos = torch.arange(self.lengths[s], self.lengths[s] + n)
            blk = torch.tensor(table, dtype=torch.int64)[pos // self.block_size]
            slots.append(blk * self.block_size + pos % self.block_size)
            self.lengths[s] += n
        return torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)

    def rollback(self, seq_ids: Sequence[int], n_new: Sequence[int]) -> None:
        """Undo :meth:`reserve` (a failed step): shrink lengths, free pages no longer used."""
        for s, n in zip(seq_ids, n_new):
            self.lengths[s] -= n
            keep = math.ceil(self.lengths[s] / self.block_size)
            table = self.tables[s]
            while len(table) > keep:
                self._free.append(table.pop())

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 [len(seq_ids), max pages of them]: each row the sequence's page ids in
        order, padded with 0 (never read: attention stops at the context length)."""
        width = max([len(self.tables[s]) for s in seq_ids] + [1])
        bt = torch.zeros((len(seq_ids), width), dtype=torch.int32)
        for i, s in enumerate(seq_ids):
            t = self.tables[s]
            if t:
                bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        return bt

    def gather(self, layer: int, seq_id: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` (default all) cached K and V rows of a sequence, dense
        ``[n, nkv, D]`` float32 each (for the reference attention and for tests)."""
        n = self.lengths[seq_id] if n is None else n
        if n > self.lengths[seq_id]:
            raise ValueError(f"sequence {seq_id} holds {self.lengths[seq_id]} tokens, asked for {n}")
        blocks = torch.tensor(self.tables[seq_id], dtype=torch.int64)
        nb = math.ceil(n / self.block_size)

        def dense(t: torch.Tensor) -> torch.Tensor:
            pages = t[blocks[:nb]]  # [nb, nkv, bs, D]
            return pages.permute(0, 2, 1, 3).reshape(nb * self.block_size, t.shape[1], t.shape[3])[:n].float()

        return dense(self.k[layer]), dense(self.v[layer])
