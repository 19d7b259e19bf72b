"""Qwen3 decoder: layer weights, one decoder layer, and a stateless full forward.

Weight names are transformers' ``Qwen3ForCausalLM`` names (``model.layers.{i}.self_attn.q_proj.weight``
...; see :mod:`llm_kernels.models.qwen3.weights`). ``lm_head.weight`` is absent when
``tie_word_embeddings`` is set (the head is ``model.embed_tokens.weight``).

Source: transformers ``models/qwen3/modeling_qwen3.py`` (``Qwen3DecoderLayer``,
``Qwen3Model``, ``Qwen3ForCausalLM``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...models.qwen3.config import Qwen3Config
from ...numerics.linear import linear
from ...numerics.rounding import check_dtype, rnd
from .attention import attention
from .common import rms_norm, rope_cos_sin
from .mlp import down_residual, gate_up_swiglu
from .o_proj import o_proj_residual_norm
from .qk_norm_rope import qk_norm_rope
from .qkv_proj import input_norm_qkv

__all__ = ["LayerWeights", "embed", "lm_head_weight", "logits_head", "decoder_layer", "forward"]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors (float [out, in] or QuantWeight for the projections)."""

    input_layernorm: torch.Tensor
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_proj: Any
    up_proj: Any
    down_proj: Any

    @classmethod
    def from_weights(cls, weights: dict[str, Any], layer: int) -> "LayerWeights":
        """Pick layer ``layer``'s tensors out of a checkpoint dict; KeyError names a missing one."""
        p = f"model.layers.{layer}."

        def get(name: str) -> Any:
            try:
                return weights[p + name]
            except KeyError:
                raise KeyError(f"weights are missing {p + name!r}") from None

        return cls(
            input_layernorm=get("input_layernorm.weight"),
            q_proj=get("self_attn.q_proj.weight"), k_proj=get("self_attn.k_proj.weight"),
            v_proj=get("self_attn.v_proj.weight"), o_proj=get("self_attn.o_proj.weight"),
            q_norm=get("self_attn.q_norm.weight"), k_norm=get("self_attn.k_norm.weight"),
            post_attention_layernorm=get("post_attention_layernorm.weight"),
            gate_proj=get("mlp.gate_proj.weight"), up_proj=get("mlp.up_proj.weight"),
            down_proj=get("mlp.down_proj.weight"))


def embed(weights: dict[str, Any], input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """input_ids [T] int -> [T, hidden] float32 holding ``dtype`` values."""
    return rnd(weights["model.embed_tokens.weight"][input_ids].float(), dtype)


def lm_head_weight(weights: dict[str, Any], cfg: Qwen3Config) -> Any:
    """``lm_head.weight``, or the embedding when ``cfg.tie_word_embeddings``."""
    return weights["model.embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]


def logits_head(weights: dict[str, Any], cfg: Qwen3Config, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Final RMSNorm then lm_head: x [T, hidden] -> logits [T, vocab] float32 (``dtype`` values)."""
    xn = rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps, dtype)
    return linear(xn, lm_head_weight(weights, cfg), dtype)


def decoder_layer(lw: LayerWeights, cfg: Qwen3Config, x: torch.Tensor, positions: torch.Tensor,
                  k_past: torch.Tensor | None, v_past: torch.Tensor | None, past_positions: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer for T new tokens of one sequence.

    x [T, hidden]; positions [T]; optional past K/V [S, nkv, D] (post-norm, post-RoPE, as
    cached) at ``past_positions`` [S]. Returns (x_out [T, hidden], k_new [T, nkv, D],
    v_new [T, nkv, D]): the new K/V are what a KV cache stores."""
    eps = cfg.rms_norm_eps
    T = x.shape[0]
    q, k, v = input_norm_qkv(x, lw.input_layernorm, lw.q_proj, lw.k_proj, lw.v_proj, eps, dtype)
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, positions, dtype)
    qh, kh = qk_norm_rope(q, k, lw.q_norm, lw.k_norm, cos, sin, eps, dtype)
    vh = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    if k_past is not None:
        k_all, v_all = torch.cat([k_past, kh]), torch.cat([v_past, vh])
        kv_pos = torch.cat([past_positions, positions])
    else:
        k_all, v_all, kv_pos = kh, vh, positions
    attn = attention(qh, k_all, v_all, positions, kv_pos, cfg.softmax_scale, dtype)
    h, hn = o_proj_residual_norm(attn, lw.o_proj, x, lw.post_attention_layernorm, eps, dtype)
    out = down_residual(gate_up_swiglu(hn, lw.gate_proj, lw.up_proj, dtype), lw.down_proj, h, dtype)
    return out, kh, vh


def forward(weights: dict[str, Any], cfg: Qwen3Config, input_ids: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stateless full forward of one sequence: input_ids [T] -> logits [T, vocab] float32
    (holding ``dtype`` values). Positions are ``0..T-1``.

    Raises ValueError for a bad dtype, an empty or 2-D input, or ids outside the vocab."""
    check_dtype(dtype)
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise ValueError(f"input_ids must be in [0, {cfg.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    pos = torch.arange(ids.numel())
    x = embed(weights, ids, dtype)
    for i in range(cfg.num_hidden_layers):
        x, _, _ = decoder_layer(LayerWeights.from_weights(weights, i), cfg, x, pos, None, None, None, dtype)
    return logits_head(weights, cfg, x, dtype)
