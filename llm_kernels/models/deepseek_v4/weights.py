"""Hugging Face / DeepSeek release weight names of ``DeepseekV4ForCausalLM``.

Canonical names are DeepSeek's release naming, which transformers 5.x reads (through its
``conversion_mapping``) and which real checkpoints use::

    embed.weight, head.weight, norm.weight, hc_head_fn, hc_head_base, hc_head_scale,
    layers.{i}.attn.wq_a.weight, layers.{i}.attn.compressor.ape, layers.{i}.ffn.experts.{e}.w1.weight, ...

``transformers``' ``save_pretrained`` writes the same per-layer names under a ``model.``
prefix and three renamed globals (``model.embed_tokens.weight``, ``model.norm.weight``,
``model.hc_head.hc_fn``/``hc_base``/``hc_scale``); :func:`canonical_name` maps those back.
The multi-token-prediction block ``k`` (``num_nextn_predict_layers``, spec §12.1; DeepSeek's
``inference/model.py`` ``MTPBlock``) is stored under ``mtp.{k}.``: an ordinary sliding-window
layer (``attn.*``, ``ffn.*``, ``attn_norm``, ``ffn_norm``, ``hc_attn_*``, ``hc_ffn_*``, never
hash-routed) plus ``e_proj``, ``h_proj`` ([D, D]), ``enorm``, ``hnorm``, ``norm`` ([D]) and its
own ``hc_head_fn/base/scale``; embedding and head are the main model's. A config with
``num_nextn_predict_layers = 0`` (what :func:`load_checkpoint` uses unless asked for the
block) expects none and ignores stored ``mtp.*`` tensors.

Shapes follow ``shared/design/deepseek_v4_architecture.md`` §3, §6-§10 (weights stored
``[out, in]`` as in ``nn.Linear``).
"""

from __future__ import annotations

import math
import re

import torch

from ...checkpoint.tensor_info import TensorInfo
from .. import random_init
from .config import CSA, SLIDING, DeepSeekV4Config

__all__ = ["expected_float_tensors", "canonical_name", "is_ignored", "pipeline_part", "is_fp32_tensor", "is_w8a8_weight",
           "is_int8_weight", "INT8_WEIGHT_RE", "INT8_MODULES",
           "W8A8_WEIGHT_RE", "W8A8_MODULES", "FP32_TENSOR_SUFFIXES", "init_tensor", "check_int_tensor",
           "release_format", "release_scale_name", "RELEASE_SCALE_FMT", "RELEASE_QUANT_EXTRA"]

# Weights stored INT8 (per-output-channel, ``.weight`` int8 + ``.weight_scale`` fp32 [out]) in
# the W8A8 format (spec §0.3 "Storage dtypes"): wq_b, wo_b, indexer wq_b, shared and routed
# expert w1/w2/w3. Everything else stays float.
#: A decoder layer's or an MTP block's name prefix.
LAYER_PREFIX = r"(?:layers|mtp)\.\d+\."
W8A8_WEIGHT_RE = re.compile(
    r"^(?:layers|mtp)\.\d+\.(attn\.wq_b|attn\.wo_b|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|"
    r"ffn\.experts\.\d+\.w[123])\.weight$|^mtp\.\d+\.[eh]_proj\.weight$")
W8A8_MODULES = ["attn.wq_b", "attn.wo_b", "attn.indexer.wq_b", "ffn.shared_experts.w1/w2/w3",
                "ffn.experts.*.w1/w2/w3", "mtp.*.e_proj/h_proj"]


def is_w8a8_weight(name: str) -> bool:
    """True for the release ``*.weight`` names stored INT8 in the W8A8 format."""
    return W8A8_WEIGHT_RE.match(name) is not None


# The ``int8`` scheme: every 2-D weight a Q8-class format (llama.cpp Q8_0) quantises, in the
# W8A8 recipe (per-output-channel INT8 weights, per-token INT8 activations): the W8A8 set
# plus the output head, the attention projections wq_a, wkv, wo_a (per group: each group's
# (token, group) rows are quantised on their own), the main and indexer compressors' wkv /
# wgate and the indexer's weights_proj. Float: the embedding (a row gather), the router
# ``gate`` (selection is sensitive to its logits; 0.1 MB per layer) and every 1-D/fp32 tensor.
# Accuracy and bytes per class: docs/performance.md "INT8 weight classes".
INT8_WEIGHT_RE = re.compile(
    r"^(head|(?:layers|mtp)\.\d+\.attn\.(wq_a|wkv|wo_a|(indexer\.)?compressor\.(wkv|wgate)|"
    r"indexer\.weights_proj))\.weight$")
INT8_MODULES = W8A8_MODULES + ["head", "attn.wq_a", "attn.wkv", "attn.wo_a", "attn.compressor.wkv/wgate",
                               "attn.indexer.compressor.wkv/wgate", "attn.indexer.weights_proj"]


def is_int8_weight(name: str) -> bool:
    """True for the weights stored INT8 in the ``int8`` scheme (the W8A8 set and the
    :data:`INT8_WEIGHT_RE` names)."""
    return is_w8a8_weight(name) or INT8_WEIGHT_RE.match(name) is not None


# The release checkpoints (DeepSeek's ``inference/`` code, ``weights_flash.py``; spec §0 and
# §10): the attention projections wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b and the
# shared experts are FP8 e4m3 with one UE8M0 scale per 128 x 128 block
# (``<module>.scale`` float8_e8m0fnu); the routed experts are MXFP4 (``<module>.weight``
# int8 ``[out, in/2]`` E2M1 pairs + ``<module>.scale`` ``[out, in/32]``); the compressors,
# the indexer's compressor and weights_proj, the head, the router, norms, mHC, sinks and
# ``ape`` stay float (transformers' ``DeepseekV4PreTrainedModel`` notes the same BF16 set).
RELEASE_FP8_RE = re.compile(
    r"^(?:layers|mtp)\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight$"
    r"|^mtp\.\d+\.[eh]_proj\.weight$")
RELEASE_MXFP4_RE = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$")
#: Storage of the FP8 block scales, and the release's extra ``quantization_config`` keys.
RELEASE_SCALE_FMT = "ue8m0"
RELEASE_QUANT_EXTRA = {"scale_fmt": "ue8m0", "expert_dtype": "fp4"}


def release_format(name: str) -> str | None:
    """``"fp8"`` / ``"mxfp4"`` for the weights the release stores in that format, else None."""
    if RELEASE_MXFP4_RE.match(name):
        return "mxfp4"
    return "fp8" if RELEASE_FP8_RE.match(name) else None


def release_scale_name(name: str) -> str:
    """The scale tensor of release weight ``name``: ``<module>.weight`` -> ``<module>.scale``."""
    return name[: -len("weight")] + "scale"


# Tensors kept in float32 whatever the compute dtype: DeepSeek's FP32 parameters (HC,
# sinks, compressor ape, router bias) and every RMSNorm weight, which transformers keeps in
# fp32 at bf16 load (``_keep_in_fp32_modules_strict``) and multiplies in fp32.
FP32_TENSOR_SUFFIXES = (
    "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
    "hc_head_fn", "hc_head_base", "hc_head_scale", "attn_sink", "ape", "gate.bias",
    "norm.weight", "attn_norm.weight", "ffn_norm.weight", "q_norm.weight", "weight_scale",
    "enorm.weight", "hnorm.weight",
)



def is_fp32_tensor(name: str) -> bool:
    """True when release ``name`` is one of the tensors always kept in float32 (a
    :data:`FP32_TENSOR_SUFFIXES` suffix at a name-component boundary)."""
    return any(name == s or name.endswith("." + s) for s in FP32_TENSOR_SUFFIXES)


_GLOBAL_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "lm_head.weight": "head.weight",
}




def canonical_name(name: str) -> str:
    """Map a transformers ``save_pretrained`` name to the release name (identity otherwise)."""
    if name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[name]
    if name.startswith("model.layers."):
        return name[len("model."):]
    return name


_MTP_RE = re.compile(r"^(?:model\.)?mtp\.(\d+)\.")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_HEAD_PART = ("head.", "norm.", "hc_head_", "mtp.")


def pipeline_part(name: str, cfg: DeepSeekV4Config | None = None) -> int | str | None:
    """Where a canonical tensor name lives when the layers are split into pipeline stages:
    the decoder layer index for ``layers.<i>.*``; ``"embed"`` (first stage) for
    ``embed.weight``; ``"head"`` (last stage) for ``head.weight``, ``norm.weight``,
    ``hc_head_*`` and the MTP blocks ``mtp.<k>.*`` (which read the last layer's output);
    None: needed by every stage (none at present)."""
    m = _LAYER_RE.match(name)
    if m is not None:
        return int(m.group(1))
    if name.startswith("embed."):
        return "embed"
    if name.startswith(_HEAD_PART):
        return "head"
    return None



def is_ignored(name: str, cfg: DeepSeekV4Config | None = None) -> bool:
    """True for stored tensors the loaded model does not use: an ``mtp.{k}.*`` tensor whose
    block ``k`` is not part of ``cfg`` (``k >= num_nextn_predict_layers``; every block
    when ``cfg`` is None)."""
    m = _MTP_RE.match(name)
    if m is None:
        return False
    return cfg is None or int(m.group(1)) >= cfg.num_nextn_predict_layers


def expected_float_tensors(cfg: DeepSeekV4Config) -> dict[str, TensorInfo]:
    """Every float (and ``tid2eid`` int) tensor of a ``DeepseekV4ForCausalLM`` checkpoint for
    ``cfg``, by release name, with its ``[out, in]`` shape (spec §3, §6-§10, §12.1: the
    ``num_nextn_predict_layers`` MTP blocks after the decoder layers)."""
    D, HC, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    t: dict[str, TensorInfo] = {
        "embed.weight": TensorInfo((V, D)),
        "head.weight": TensorInfo((V, D)),
        "norm.weight": TensorInfo((D,)),
        "hc_head_fn": TensorInfo((HC, HC * D)),
        "hc_head_base": TensorInfo((HC,)),
        "hc_head_scale": TensorInfo((1,)),
    }
    for i in range(cfg.num_hidden_layers):
        _layer_tensors(t, cfg, f"layers.{i}.", i)
    for k in range(cfg.num_nextn_predict_layers):  # MTP blocks (spec §12.1)
        p = f"mtp.{k}."
        _layer_tensors(t, cfg, p, cfg.mtp_layer(k))
        t[p + "e_proj.weight"] = TensorInfo((D, D))
        t[p + "h_proj.weight"] = TensorInfo((D, D))
        for norm in ("enorm", "hnorm", "norm"):
            t[p + f"{norm}.weight"] = TensorInfo((D,))
        t[p + "hc_head_fn"] = TensorInfo((HC, HC * D))
        t[p + "hc_head_base"] = TensorInfo((HC,))
        t[p + "hc_head_scale"] = TensorInfo((1,))
    return t


def _layer_tensors(t: dict[str, TensorInfo], cfg: DeepSeekV4Config, p: str, i: int) -> None:
    """Add the tensors of layer id ``i`` (a decoder layer or an MTP block) under prefix ``p``."""
    D, H, HD, QL = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    G, OL, HC, MIX = cfg.o_groups, cfg.o_lora_rank, cfg.hc_mult, cfg.mix_hc
    E, K, I, V = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.vocab_size
    IH, IHD = cfg.index_n_heads, cfg.index_head_dim
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
    lt = cfg.layer_type(i)
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


def init_tensor(name: str, info: TensorInfo, cfg: DeepSeekV4Config, g: torch.Generator,
                weight_scale: float) -> torch.Tensor:
    """The float32 (int64 for tid2eid) random init of one tensor (docs/checkpoints.md):
    scales that keep activations O(1) through the random model."""
    shape = info.shape
    D = cfg.hidden_size
    leaf = name.rsplit(".", 1)[-1]

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return random_init.normal(shape, g, std, mean)

    HC = cfg.hc_mult

    if info.kind == "int":  # gate.tid2eid: K distinct experts per token, uniform
        K = shape[1]
        r = torch.rand((shape[0], cfg.n_routed_experts), generator=g)
        return r.argsort(dim=1)[:, :K].contiguous().to(torch.int64)
    if name == "embed.weight":
        return normal(1.0)
    if name == "head.weight":
        return normal(1.0 / math.sqrt(D))
    if re.search(r"(^|\.)hc_(attn|ffn|head)_fn$", name):
        return normal(1.0 / math.sqrt(HC * D))
    if re.search(r"hc_(attn|ffn|head)_base$", name):
        return normal(0.5)
    if re.search(r"hc_(attn|ffn|head)_scale$", name):
        return torch.rand(shape, generator=g, dtype=torch.float32).add_(0.5)
    if leaf == "attn_sink":
        return normal(1.0)
    if leaf == "ape":
        return normal(0.5)
    if name.endswith("gate.bias"):
        return normal(0.1)
    if name.endswith("ffn.gate.weight"):
        return normal(1.0 / math.sqrt(D))
    if name.endswith("norm.weight"):
        return normal(0.1, mean=1.0)
    if name.endswith(".weight") and len(shape) == 2:  # nn.Linear [out, in]
        return normal(weight_scale / math.sqrt(shape[1]))
    raise AssertionError(f"no init rule for tensor {name!r} {shape}")  # pragma: no cover


def check_int_tensor(name: str, t: torch.Tensor, cfg: DeepSeekV4Config) -> str | None:
    """``gate.tid2eid`` [vocab, K]: every entry in [0, n_routed_experts) and every row K
    distinct experts. Returns the problem (without the tensor label) or None."""
    E = cfg.n_routed_experts
    ti = t.to(torch.int64)
    bad = ((ti < 0) | (ti >= E)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        vals = ti[row].tolist()
        offending = [v for v in vals if not 0 <= v < E]
        return (
            f"expected expert ids in [0, {E}), got {offending[0]} in row {row} "
            f"(token id {row}: {vals}); {int(bad.sum())} bad row(s) in total")
    if ti.shape[1] > 1:
        s = ti.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            return (
                f"expected {ti.shape[1]} distinct experts per row, row {row} "
                f"(token id {row}) repeats an expert: {ti[row].tolist()}; {int(dup.sum())} bad row(s) in total")
    return None
