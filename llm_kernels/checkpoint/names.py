"""Hugging Face / DeepSeek release weight names of ``DeepseekV4ForCausalLM``.

Canonical names are DeepSeek's release naming, which transformers 5.x reads (through its
``conversion_mapping``) and which real checkpoints use::

    embed.weight, head.weight, norm.weight, hc_head_fn, hc_head_base, hc_head_scale,
    layers.{i}.attn.wq_a.weight, layers.{i}.attn.compressor.ape, layers.{i}.ffn.experts.{e}.w1.weight, ...

``transformers``' ``save_pretrained`` writes the same per-layer names under a ``model.``
prefix and three renamed globals (``model.embed_tokens.weight``, ``model.norm.weight``,
``model.hc_head.hc_fn``/``hc_base``/``hc_scale``); :func:`canonical_name` maps those back.
Multi-token-prediction weights (``mtp.*``) are not used by the main model and are ignored.

Shapes follow ``shared/design/deepseek_v4_architecture.md`` §3, §6-§10 (weights stored
``[out, in]`` as in ``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CSA, SLIDING, DeepSeekV4Config, Qwen3Config
from .qwen3_names import QWEN3_W8A8_WEIGHT_RE, expected_float_qwen3

__all__ = ["TensorInfo", "expected_tensors", "canonical_name", "is_ignored", "FP32_TENSOR_SUFFIXES",
           "W8A8_WEIGHT_RE", "is_w8a8_weight", "QUANT_METHOD_W8A8"]

import re

# Weights stored INT8 (per-output-channel, ``.weight`` int8 + ``.weight_scale`` fp32 [out]) in
# the W8A8 format (spec §0.3 "Storage dtypes"): wq_b, wo_b, indexer wq_b, shared and routed
# expert w1/w2/w3. Everything else stays float.
W8A8_WEIGHT_RE = re.compile(
    r"^layers\.\d+\.(attn\.wq_b|attn\.wo_b|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|"
    r"ffn\.experts\.\d+\.w[123])\.weight$")
QUANT_METHOD_W8A8 = "llm_kernels_w8a8"


def is_w8a8_weight(name: str) -> bool:
    """True for the canonical ``*.weight`` names stored INT8 in the W8A8 format (DeepSeek-V4
    release names, or Qwen3's projection names; the two namings do not overlap)."""
    return W8A8_WEIGHT_RE.match(name) is not None or QWEN3_W8A8_WEIGHT_RE.match(name) is not None

# Tensors kept in float32 whatever the compute dtype: DeepSeek's FP32 parameters (HC,
# sinks, compressor ape, router bias) and every RMSNorm weight, which transformers keeps in
# fp32 at bf16 load (``_keep_in_fp32_modules_strict``) and multiplies in fp32.
FP32_TENSOR_SUFFIXES = (
    "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
    "hc_head_fn", "hc_head_base", "hc_head_scale", "attn_sink", "ape", "gate.bias",
    "norm.weight", "attn_norm.weight", "ffn_norm.weight", "q_norm.weight", "weight_scale",
)

_GLOBAL_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "lm_head.weight": "head.weight",
}


@dataclass(frozen=True)
class TensorInfo:
    """Expected shape and kind ("float" or "int") of one checkpoint tensor."""

    shape: tuple[int, ...]
    kind: str = "float"


def canonical_name(name: str, cfg=None) -> str:
    """Map a transformers ``save_pretrained`` name to the release name (identity otherwise).
    For a :class:`Qwen3Config` the transformers names are canonical (identity)."""
    if isinstance(cfg, Qwen3Config):
        return name
    if name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[name]
    if name.startswith("model.layers."):
        return name[len("model."):]
    return name


def is_ignored(name: str, cfg=None) -> bool:
    """True for tensors the main model does not use (DeepSeek-V4's MTP block; nothing for Qwen3)."""
    if isinstance(cfg, Qwen3Config):
        return False
    return name.startswith("mtp.") or name.startswith("model.mtp.")


def expected_tensors(cfg: DeepSeekV4Config | Qwen3Config, quant: str | None = None) -> dict[str, TensorInfo]:
    """Every tensor a ``DeepseekV4ForCausalLM`` (or, for a :class:`Qwen3Config`,
    ``Qwen3ForCausalLM``) checkpoint must hold for ``cfg``, by canonical name, with its shape. ``quant="w8a8"``: the :func:`is_w8a8_weight` tensors are
    kind ``"int8"`` and each has a ``<name>_scale`` ([out] float32) companion."""
    if quant not in (None, "w8a8"):
        raise ValueError(f"quant must be None or 'w8a8', got {quant!r}")
    if isinstance(cfg, Qwen3Config):
        t = {n: TensorInfo(shape) for n, shape in expected_float_qwen3(cfg).items()}
    else:
        t = _expected_float(cfg)
    if quant is None:
        return t
    out: dict[str, TensorInfo] = {}
    for name, info in t.items():
        if is_w8a8_weight(name):
            out[name] = TensorInfo(info.shape, kind="int8")
            out[name + "_scale"] = TensorInfo((info.shape[0],))
        else:
            out[name] = info
    return out


def _expected_float(cfg: DeepSeekV4Config) -> dict[str, TensorInfo]:
    D, H, HD, QL = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    G, OL, HC, MIX = cfg.o_groups, cfg.o_lora_rank, cfg.hc_mult, cfg.mix_hc
    E, K, I, V = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.vocab_size
    IH, IHD = cfg.index_n_heads, cfg.index_head_dim
    t: dict[str, TensorInfo] = {
        "embed.weight": TensorInfo((V, D)),
        "head.weight": TensorInfo((V, D)),
        "norm.weight": TensorInfo((D,)),
        "hc_head_fn": TensorInfo((HC, HC * D)),
        "hc_head_base": TensorInfo((HC,)),
        "hc_head_scale": TensorInfo((1,)),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        t[p + "attn_norm.weight"] = TensorInfo((D,))
        t[p + "ffn_norm.weight"] = TensorInfo((D,))
        for sub in ("attn", "ffn"):
            t[p + f"hc_{sub}_fn"] = TensorInfo((MIX, HC * D))
            t[p + f"hc_{sub}_base"] = TensorInfo((MIX,))
            t[p + f"hc_{sub}_scale"] = TensorInfo((3,))
        a = p + "attn."
        t[a + "wq_a.weight"] = TensorInfo((QL, D))
        t[a + "q_norm.weight"] = TensorInfo((QL,))
        t[a + "wq_b.weight"] = TensorInfo((H * HD, QL))
        t[a + "wkv.weight"] = TensorInfo((HD, D))
        t[a + "norm.weight"] = TensorInfo((HD,))
        t[a + "wo_a.weight"] = TensorInfo((G * OL, H * HD // G))
        t[a + "wo_b.weight"] = TensorInfo((D, G * OL))
        t[a + "attn_sink"] = TensorInfo((H,))
        lt = cfg.layer_types[i]
        if lt != SLIDING:
            ratio = cfg.compress_ratio(i)
            coff = 2 if lt == CSA else 1
            c = a + "compressor."
            t[c + "wkv.weight"] = TensorInfo((coff * HD, D))
            t[c + "wgate.weight"] = TensorInfo((coff * HD, D))
            t[c + "ape"] = TensorInfo((ratio, coff * HD))
            t[c + "norm.weight"] = TensorInfo((HD,))
        if lt == CSA:
            ratio = cfg.compress_ratio(i)
            x = a + "indexer."
            t[x + "wq_b.weight"] = TensorInfo((IH * IHD, QL))
            t[x + "weights_proj.weight"] = TensorInfo((IH, D))
            t[x + "compressor.wkv.weight"] = TensorInfo((2 * IHD, D))
            t[x + "compressor.wgate.weight"] = TensorInfo((2 * IHD, D))
            t[x + "compressor.ape"] = TensorInfo((ratio, 2 * IHD))
            t[x + "compressor.norm.weight"] = TensorInfo((IHD,))
        f = p + "ffn."
        t[f + "gate.weight"] = TensorInfo((E, D))
        if cfg.is_hash_layer(i):
            t[f + "gate.tid2eid"] = TensorInfo((V, K), kind="int")
        else:
            t[f + "gate.bias"] = TensorInfo((E,))
        for e in range(E):
            t[f + f"experts.{e}.w1.weight"] = TensorInfo((I, D))
            t[f + f"experts.{e}.w3.weight"] = TensorInfo((I, D))
            t[f + f"experts.{e}.w2.weight"] = TensorInfo((D, I))
        t[f + "shared_experts.w1.weight"] = TensorInfo((I, D))
        t[f + "shared_experts.w3.weight"] = TensorInfo((I, D))
        t[f + "shared_experts.w2.weight"] = TensorInfo((D, I))
    return t
