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

import math
import re

import torch

from ...checkpoint.tensor_info import TensorInfo
from .. import random_init
from .config import Qwen3Config

__all__ = ["W8A8_WEIGHT_RE", "W8A8_MODULES", "expected_float_tensors", "canonical_name", "is_ignored", "pipeline_part",
           "is_fp32_tensor", "is_w8a8_weight", "is_int8_weight", "INT8_MODULES", "init_tensor",
           "check_int_tensor", "release_format", "release_scale_name", "RELEASE_SCALE_FMT", "RELEASE_QUANT_EXTRA"]

W8A8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


W8A8_MODULES = ["self_attn.q_proj/k_proj/v_proj/o_proj", "mlp.gate_proj/up_proj/down_proj"]


def is_w8a8_weight(name: str) -> bool:
    """True for the seven projection matrices of a layer (stored INT8 in the W8A8 format)."""
    return W8A8_WEIGHT_RE.match(name) is not None


#: The ``int8`` scheme (every 2-D weight a Q8-class format quantises): the W8A8 set plus an
#: untied ``lm_head`` (per-row INT8 weights, per-token INT8 activations). The embedding is a
#: row gather and stays float (a tied head is the embedding, so it stays float too).
INT8_MODULES = W8A8_MODULES + ["lm_head"]


def is_int8_weight(name: str) -> bool:
    """True for the weights stored INT8 in the ``int8`` scheme: the W8A8 set and ``lm_head``."""
    return is_w8a8_weight(name) or name == "lm_head.weight"


# Qwen3-FP8 releases: the seven projections of each layer are FP8 e4m3 with one bfloat16
# scale per 128 x 128 block (``<name>_scale_inv``, ``[ceil(out/128), ceil(in/128)]``);
# embeddings, lm_head and norms stay bfloat16 (``quant_method: "fp8"``, ``fmt: "e4m3"``).
RELEASE_SCALE_FMT = "bf16"
RELEASE_QUANT_EXTRA: dict = {}


def release_format(name: str) -> str | None:
    """``"fp8"`` for the weights Qwen3-FP8 stores FP8 (the W8A8 set), else None."""
    return "fp8" if is_w8a8_weight(name) else None


def release_scale_name(name: str) -> str:
    """``<module>.weight`` -> ``<module>.weight_scale_inv``."""
    return name + "_scale_inv"


def canonical_name(name: str) -> str:
    """transformers' names are canonical for Qwen3 (identity)."""
    return name


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def pipeline_part(name: str, cfg=None) -> int | str | None:
    """Where a tensor lives when the layers are split into pipeline stages: the decoder
    layer index for ``model.layers.<i>.*``; ``"embed"`` (first stage) for the embedding,
    ``"embed_head"`` (first and last stage) when ``cfg.tie_word_embeddings`` makes it the
    head too; ``"head"`` (last stage) for ``model.norm.weight`` and ``lm_head.*``; None:
    every stage."""
    m = _LAYER_RE.match(name)
    if m is not None:
        return int(m.group(1))
    if name.startswith("model.embed_tokens."):
        return "embed_head" if cfg is not None and getattr(cfg, "tie_word_embeddings", False) else "embed"
    if name.startswith(("model.norm.", "lm_head.")):
        return "head"
    return None


def is_ignored(name: str, cfg=None) -> bool:
    """No stored tensor is ignored for Qwen3."""
    return False


def is_fp32_tensor(name: str) -> bool:
    """Only W8A8 ``weight_scale`` tensors: Qwen3's norm weights live in the model dtype
    (transformers ``Qwen3RMSNorm`` multiplies by a ``dtype`` weight)."""
    return name.endswith("weight_scale")


def check_int_tensor(name: str, t: torch.Tensor, cfg: Qwen3Config) -> str | None:
    """Qwen3 has no integer tensors; nothing to check."""
    return None


def expected_float_tensors(cfg: Qwen3Config) -> dict[str, TensorInfo]:
    """Every float tensor of a Qwen3 checkpoint for ``cfg`` (name -> TensorInfo), in the order
    transformers' ``save_pretrained`` lists them."""
    return {n: TensorInfo(s) for n, s in _shapes(cfg).items()}


def init_tensor(name: str, info: TensorInfo, cfg: Qwen3Config, g: torch.Generator,
                weight_scale: float) -> torch.Tensor:
    """Random init (docs/checkpoints.md): Linear ~ N(0, weight_scale/sqrt(in)), norms ~
    1 + N(0, 0.1), embeddings N(0, 1), an untied head N(0, 1/sqrt(hidden))."""
    shape = info.shape

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return random_init.normal(shape, g, std, mean)

    if name == "model.embed_tokens.weight":
        # O(1) embeddings; when tied this is also the head (logits then scale with sqrt(D)).
        return normal(1.0)
    if name == "lm_head.weight":
        return normal(1.0 / math.sqrt(cfg.hidden_size))
    if name.endswith("norm.weight"):
        return normal(0.1, mean=1.0)
    if len(shape) == 2:
        return normal(weight_scale / math.sqrt(shape[1]))
    raise AssertionError(f"no init rule for tensor {name!r} {shape}")  # pragma: no cover


def _shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
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
