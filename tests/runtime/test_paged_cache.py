"""PagedKVCache: page allocation, slots, block tables, capacity errors, rollback, release."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.models import preset
from llm_kernels.errors import CacheOverflowError
from llm_kernels.runtime.paged_cache import PagedKVCache

CFG = preset("qwen3-mini", num_hidden_layers=1)


def test_slots_and_block_table():
    c = PagedKVCache(CFG, num_blocks=6, block_size=4, dtype=torch.float32, max_seq_len=64)
    c.add_sequence(0)
    c.add_sequence(1)
    s0 = c.reserve([0, 1], [5, 2])  # seq 0 takes pages 0,1; seq 1 page 2
    assert s0.tolist() == [0, 1, 2, 3, 4, 8, 9]
    s1 = c.reserve([0, 1], [4, 3])  # seq 0: row 5..8 -> page 1 rows 1-3, page 3 row 0
    assert s1.tolist() == [5, 6, 7, 12, 10, 11, 16]
    bt = c.block_table([0, 1])
    assert bt.dtype == torch.int32 and bt.tolist() == [[0, 1, 3], [2, 4, 0]]
    # gather returns rows in position order
    for pos_slot, val in zip(torch.cat([s0[:5], s1[:4]]).tolist(), range(9)):
        c.k[0][pos_slot // 4, :, pos_slot % 4, :] = val
    k, v = c.gather(0, 0)
    assert k.shape == (9, CFG.num_key_value_heads, CFG.head_dim)
    assert k[:, 0, 0].tolist() == list(range(9))


def test_capacity_errors_change_nothing():
    c = PagedKVCache(CFG, num_blocks=3, block_size=4, dtype=torch.bfloat16, max_seq_len=10)
    c.add_sequence(0)
    c.add_sequence(1)
    with pytest.raises(CacheOverflowError, match="max_seq_len=10"):
        c.reserve([0], [11])
    c.reserve([0], [8])
    with pytest.raises(CacheOverflowError, match="needs 2 more KV pages .* only 1 of 3"):
        c.reserve([0, 1], [1, 4])  # 1 token -> page 3 of seq 0, 4 tokens -> page of seq 1
    assert c.lengths == {0: 8, 1: 0} and c.free_blocks == 1
    with pytest.raises(KeyError):
        c.reserve([5], [1])


def test_rollback_and_release_reuse_pages():
    c = PagedKVCache(CFG, num_blocks=4, block_size=4, dtype=torch.float32, max_seq_len=16)
    c.add_sequence(0)
    c.reserve([0], [3])
    c.reserve([0], [6])
    assert c.free_blocks == 1
    c.rollback([0], [6])
    assert c.lengths[0] == 3 and c.free_blocks == 3
    c.release(0)
    assert c.free_blocks == 4
    with pytest.raises(ValueError, match="already exists"):
        c.add_sequence(1) or c.add_sequence(1)


def test_bad_geometry():
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(CFG, 4, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(CFG, 4, 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        PagedKVCache(CFG, 4, 4, max_seq_len=CFG.max_position_embeddings + 1)
