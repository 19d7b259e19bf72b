"""Hugging Face weight names of ``Qwen3ForCausalLM`` (transformers' own names; real Qwen3
releases use them too)::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied),
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight,
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.self_attn.{q,k}_norm.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight

Weights are ``[out, in]`` (``nn.Linear``); q/k norm weights are ``[head_dim]``. In the W8A8
format the seven projection matrices of each layer are INT8 (``<name>`` int8 +
``<name>_scale`` float32 [out]); embeddings, lm_head and norms stay float.
"""

from __future__ import annotations

import re

from ..config_qwen3 import Qwen3Config

__all__ = ["QWEN3_W8A8_WEIGHT_RE", "expected_float_qwen3"]

QWEN3_W8A8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def expected_float_qwen3(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every float tensor of a Qwen3 checkpoint for ``cfg``: name -> shape, in the order
    transformers' ``save_pretrained`` lists them."""
    D, V, I, HD = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    t: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (D,)
        t[p + "self_attn.q_proj.weight"] = (cfg.q_size, D)
        t[p + "self_attn.k_proj.weight"] = (cfg.kv_size, D)
        t[p + "self_attn.v_proj.weight"] = (cfg.kv_size, D)
        t[p + "self_attn.o_proj.weight"] = (D, cfg.q_size)
        t[p + "self_attn.q_norm.weight"] = (HD,)
        t[p + "self_attn.k_norm.weight"] = (HD,)
        t[p + "post_attention_layernorm.weight"] = (D,)
        t[p + "mlp.gate_proj.weight"] = (I, D)
        t[p + "mlp.up_proj.weight"] = (I, D)
        t[p + "mlp.down_proj.weight"] = (D, I)
    t["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (V, D)
    return t
