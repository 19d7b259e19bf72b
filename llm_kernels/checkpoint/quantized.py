"""The INT8 checkpoint formats: per-output-channel INT8 weights with float32 scales.

An INT8 checkpoint is an HF directory like the float one, with ``config.json`` carrying
``quantization_config = {"quant_method": "llm_kernels_w8a8" | "llm_kernels_int8", ...}``
and, for every weight of the scheme's set, ``<name>`` stored as int8 ``[out, in]`` plus
``<name>_scale`` float32 ``[out]``. Schemes (the model spec's ``quantized_weight``):

* ``w8a8``: the model's ``is_w8a8_weight`` (DeepSeek-V4: wq_b, wo_b, indexer wq_b, shared
  and routed experts, as the spec's W8A8 table; Qwen3: the seven projections of each layer);
* ``int8``: ``is_int8_weight``, every 2-D weight a Q8-class format quantises (adds the
  output head and, for DeepSeek-V4, wq_a, wkv, wo_a, the compressors and the indexer's
  weights_proj); the embedding and the router stay float.

All other tensors are stored as in the source checkpoint.

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (recipe and storage table).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..numerics.quant import QuantWeight, quantize_weight
from .names import QUANT_METHOD_W8A8, QUANT_METHODS

__all__ = ["quantize_weights", "assemble_w8a8", "quantization_config", "QUANTIZATION_CONFIG"]

QUANTIZATION_CONFIG = {
    "quant_method": QUANT_METHOD_W8A8,
    "weights": "int8, symmetric, per output channel, float32 scale (<name>_scale)",
    "activations": "int8, symmetric, dynamic per token (amax clamped at 1e-4, round half to even)",
}


def quantization_config(cfg, scheme: str = "w8a8") -> dict:
    """The ``quantization_config`` entry of a ``scheme`` checkpoint of ``cfg``'s model."""
    spec = models.spec_for_config(cfg)
    return dict(QUANTIZATION_CONFIG, quant_method=QUANT_METHODS[scheme],
                modules=list(spec.quantized_modules(scheme)))


def quantize_weights(weights: dict[str, torch.Tensor], cfg, progress: bool = False,
                     scheme: str = "w8a8") -> dict:
    """Return a copy of a canonical-name weight dict of ``cfg``'s model with the weights of
    quantisation ``scheme`` (``"w8a8"`` or ``"int8"``, see the module docstring) replaced by
    :class:`QuantWeight` (per-output-channel INT8). Weights that already are QuantWeight and
    other tensors are passed through. Raises ValueError for an unknown scheme."""
    is_int8 = models.spec_for_config(cfg).quantized_weight(scheme)
    out: dict = {}
    for name, t in tqdm(weights.items(), desc="quantize", disable=None if progress else True):
        out[name] = quantize_weight(t) if is_int8(name) and not isinstance(t, QuantWeight) else t
    return out


def assemble_w8a8(tensors: dict[str, torch.Tensor], root: Path) -> dict:
    """Replace each stored ``X.weight`` int8 + ``X.weight_scale`` float32 pair of a W8A8
    checkpoint by a :class:`QuantWeight`. Raises CheckpointError for a non-positive scale."""
    out: dict = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        if isinstance(t, torch.Tensor) and t.dtype == torch.int8:
            scale = tensors[name + "_scale"].float()
            if not bool((scale > 0).all()):
                raise CheckpointError(f"checkpoint {root}: tensor {name}_scale has non-positive entries")
            out[name] = QuantWeight(t, scale)
        else:
            out[name] = t
    return out
