"""transformers' ``DeepseekV4DecoderLayer`` on the benchmark's own tensors (no copies), for
the speed-up figure and the output cross-check of the DeepSeek-V4 layer benchmark."""

from __future__ import annotations

from typing import Any

import torch

from ...models.deepseek_v4.config import DeepSeekV4Config
from .layer import ExpertStore

__all__ = ["build_hf_layer", "hf_config", "hf_mask"]

BF16 = torch.bfloat16


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
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import (
        DeepseekV4Config as HFConfig,
    )

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
