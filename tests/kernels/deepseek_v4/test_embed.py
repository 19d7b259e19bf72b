"""Fused ``embed`` vs the reference: bitwise for bf16 and float32 tables and activations;
the reference's errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_kernels.kernels.deepseek_v4 import embed as K
from llm_kernels.models import preset
from llm_kernels.reference.deepseek_v4 import model as R


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embed_is_the_reference_bitwise(table_dtype, dtype):
    cfg = dataclasses.replace(preset("flash", num_hidden_layers=1), vocab_size=50, hidden_size=72)
    g = torch.Generator().manual_seed(0)
    w = {"embed.weight": (torch.randn(50, 72, generator=g) * 3).to(table_dtype)}
    for ids in (torch.tensor([3]), torch.tensor([0, 49, 7, 7, 12]), torch.tensor([], dtype=torch.int64),
                torch.tensor([5, 6], dtype=torch.int32)):
        a, b = K.embed(w, cfg, ids, dtype), R.embed(w, cfg, ids, dtype)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (ids.numel(), cfg.hc_mult, 72)
        assert torch.equal(a, b)


def test_embed_errors():
    cfg = dataclasses.replace(preset("flash", num_hidden_layers=1), vocab_size=50, hidden_size=8)
    w = {"embed.weight": torch.randn(50, 8).bfloat16()}
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\), got min -1 max 3"):
        K.embed(w, cfg, torch.tensor([3, -1]), torch.bfloat16)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\), got min 2 max 50"):
        K.embed(w, cfg, torch.tensor([2, 50]), torch.bfloat16)
    with pytest.raises(ValueError, match="input_ids must be 1-D"):
        K.embed(w, cfg, torch.tensor([[2, 3]]), torch.bfloat16)
