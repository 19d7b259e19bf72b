"""``RopeTables``: cos/sin looked up by position are bitwise the direct ``rope_cos_sin`` call
(both RoPE profiles of DeepSeek-V4, YaRN included, and Qwen3's), across table growth."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.models import preset
from llm_kernels.reference.deepseek_v4.common import rope_cos_sin as ds_rope
from llm_kernels.reference.qwen3.common import rope_cos_sin as qwen_rope
from llm_kernels.runtime.rope_table import RopeTables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lookup_is_bitwise_direct(dtype):
    cfg = preset("flash")
    tab = RopeTables(ds_rope, dtype, initial=64)
    g = torch.Generator().manual_seed(0)
    for rope in (cfg.rope_main, cfg.rope_compress):
        for pos in (torch.tensor([0]), torch.tensor([63]), torch.randint(0, 5000, (37,), generator=g),
                    torch.arange(4090, 4100), torch.tensor([[3, 70000], [5, 9]])):
            c, s = tab(rope, cfg.qk_rope_head_dim, pos)
            c0, s0 = ds_rope(rope, cfg.qk_rope_head_dim, pos, dtype)
            assert torch.equal(c, c0) and torch.equal(s, s0)
    assert tab._tables[(id(cfg.rope_main), cfg.qk_rope_head_dim)][0].shape[0] == 64 * 2 ** 11  # doubled past 70000


def test_qwen3_profile_and_errors():
    cfg = preset("qwen3-mini")
    tab = RopeTables(qwen_rope, torch.bfloat16)
    pos = torch.tensor([0, 1, 2047, 3000])
    c, s = tab(cfg.rope, cfg.head_dim, pos)
    c0, s0 = qwen_rope(cfg.rope, cfg.head_dim, pos, torch.bfloat16)
    assert torch.equal(c, c0) and torch.equal(s, s0)
    assert tab(cfg.rope, cfg.head_dim, torch.zeros(0, dtype=torch.long))[0].shape[0] == 0
    with pytest.raises(ValueError, match="positions must be >= 0"):
        tab(cfg.rope, cfg.head_dim, torch.tensor([-1]))


def test_memo_by_identity_and_version():
    """A repeated lookup with the same positions tensor returns the memoised tensors; an
    in-place change of the positions (or of a returned tensor) gives a fresh, correct lookup."""
    cfg = preset("flash")
    tab = RopeTables(ds_rope, torch.bfloat16, initial=64)
    pos = torch.tensor([5, 9])
    c1, s1 = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)
    c2, s2 = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)
    assert c2 is c1 and s2 is s1
    c3, _ = tab(cfg.rope_compress, cfg.qk_rope_head_dim, pos)  # another profile: its own entry
    assert not torch.equal(c3, c1)
    assert tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)[0] is c1
    pos[0] = 7
    c4, s4 = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)
    c0, s0 = ds_rope(cfg.rope_main, cfg.qk_rope_head_dim, pos, torch.bfloat16)
    assert c4 is not c1 and torch.equal(c4, c0) and torch.equal(s4, s0)
    c4.zero_()
    c5, _ = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)
    assert torch.equal(c5, c0)


def test_memo_under_inference_mode():
    """Inference tensors keep no version counter (the model bench runs in inference_mode):
    the memo works by identity there, and a new positions tensor gets its own lookup."""
    cfg = preset("flash")
    tab = RopeTables(ds_rope, torch.bfloat16, initial=64)
    with torch.inference_mode():
        pos = torch.tensor([5, 9])
        c1, _ = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)
        assert tab(cfg.rope_main, cfg.qk_rope_head_dim, pos)[0] is c1
        pos2 = torch.tensor([6, 10])
        c2, s2 = tab(cfg.rope_main, cfg.qk_rope_head_dim, pos2)
        c0, s0 = ds_rope(cfg.rope_main, cfg.qk_rope_head_dim, pos2, torch.bfloat16)
        assert torch.equal(c2, c0) and torch.equal(s2, s0)
