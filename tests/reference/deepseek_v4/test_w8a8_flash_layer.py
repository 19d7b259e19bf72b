"""W8A8 vs bf16 at real Flash dimensions, one layer of each type (issue criterion: per-layer
output cosine >= 0.999). Weights are built in memory with the checkpoint writer's init
scales (8 routed experts instead of 256 to bound memory; the per-expert math is the same)."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.checkpoint.names import expected_tensors
from llm_kernels.checkpoint.quantized import quantize_weights
from llm_kernels.checkpoint.writer import _random_tensor
from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING
from llm_kernels.models import preset
from llm_kernels.reference.deepseek_v4 import model

BF = torch.bfloat16


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("layer_type", [SLIDING, CSA, HCA])
def test_flash_dims_layer_w8a8_vs_bf16(layer_type):
    cfg = preset("flash", num_hidden_layers=1, n_routed_experts=8).replace(
        layer_types=(layer_type,), mlp_layer_types=("moe",))
    w = {}
    for name, info in expected_tensors(cfg).items():
        if name.startswith("layers.0."):
            t = _random_tensor(name, info, cfg, seed=1, weight_scale=1.0)
            w[name] = t if t.dtype == torch.int64 or "hc_" in name or name.endswith(
                ("ape", "attn_sink", "gate.bias", "norm.weight")) else t.to(BF)
    wq = quantize_weights(w, cfg)
    T = 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 1, cfg.hidden_size, generator=g).to(BF).float().expand(T, cfg.hc_mult, -1).contiguous()
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
    lb, lq = model.LayerWeights(w, 0), model.LayerWeights(wq, 0)
    a_b = model.attention_sublayer(lb, cfg, 0, x, BF)
    a_q = model.attention_sublayer(lq, cfg, 0, x, BF)
    m_b = model.moe_sublayer(lb, cfg, 0, a_b, ids, BF)
    m_q = model.moe_sublayer(lq, cfg, 0, a_b, ids, BF)
    # compare the sublayer updates (the residual stream itself would hide errors)
    c_attn, c_moe = _cos(a_q - x, a_b - x), _cos(m_q - a_b, m_b - a_b)
    print(f"{layer_type}: W8A8 vs bf16 cosine attention {c_attn:.6f}, moe {c_moe:.6f}")
    assert c_attn >= 0.999 and c_moe >= 0.999
