"""The INT8 checkpoint formats: per-output-channel INT8 weights with float32 scales.

An INT8 checkpoint is an HF directory like the float one, with ``config.json`` carrying
``quantization_config = {"quant_method": "llm_kernels_w8a8" | "llm_kernels_int8", ...}``
and, for every weight of the scheme's set, ``<name>`` stored as int8 ``[out, in]`` plus
``<name>_scale`` float32 ``[out]``. Schemes (the model spec's ``quantized_weight``):

* ``w8a8``: the model's ``is_w8a8_weight`` (DeepSeek-V4: wq_b, wo_b, indexer wq_b, shared
  and routed experts, as the spec's W8A8 table; Qwen3: the seven projections of each layer);
* ``int8``: ``is_int8_weight``, every 2-D weight a Q8-class format quantises (adds the
  output head and, for DeepSeek-V4, wq_a, wkv, wo_a, the compressors and the indexer's
  weights_proj); the embedding and the router stay float;
* ``int8_g32``: the ``int8`` set with one scale per block of 32 inputs
  (:mod:`llm_kernels.numerics.group_quant`): ``<name>_scale`` is float16 ``[out, in/32]``,
  the weights load as ``GroupQuantWeight``.

All other tensors are stored as in the source checkpoint.

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (recipe and storage table).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..kernels.common.weight_quant import quantize_weight_fast, quantize_weight_grouped_fast
from ..numerics.group_quant import GroupQuantWeight
from ..numerics.quant import QuantWeight
from .names import GROUPED_SCHEMES, QUANT_METHOD_W8A8, QUANT_METHODS

__all__ = ["quantize_weights", "assemble_w8a8", "quantization_config", "QUANTIZATION_CONFIG"]

QUANTIZATION_CONFIG = {
    "quant_method": QUANT_METHOD_W8A8,
    "weights": "int8, symmetric, per output channel, float32 scale (<name>_scale)",
    "activations": "int8, symmetric, dynamic per token (amax clamped at 1e-4, round half to even)",
}


def quantization_config(cfg, scheme: str = "w8a8") -> dict:
    """The ``quantization_config`` entry of a ``scheme`` checkpoint of ``cfg``'s model."""
    spec = models.spec_for_config(cfg)
    qc = dict(QUANTIZATION_CONFIG, quant_method=QUANT_METHODS[scheme], modules=list(spec.quantized_modules(scheme)))
    g = GROUPED_SCHEMES.get(scheme)
    if g is not None:
        qc.update(group_size=g, weights=f"int8, symmetric, one float16 scale per {g} inputs (<name>_scale "
                  f"[out, in/{g}], nearest that does not clip)", activations=f"int8, symmetric, dynamic per {g} inputs")
    return qc


def quantize_for(scheme: str):
    """The weight quantiser of ``scheme``: the golden per-row
    :func:`~llm_kernels.numerics.quant.quantize_weight`, computed bit for bit in one parallel
    pass (:func:`~llm_kernels.kernels.common.weight_quant.quantize_weight_fast`), or the
    group-scaled :func:`~llm_kernels.numerics.group_quant.quantize_weight_grouped`, likewise
    (:func:`~llm_kernels.kernels.common.weight_quant.quantize_weight_grouped_fast`). Raises
    ValueError for an unknown scheme."""
    if scheme not in QUANT_METHODS:
        raise ValueError(f"scheme must be one of {sorted(QUANT_METHODS)}, got {scheme!r}")
    g = GROUPED_SCHEMES.get(scheme)
    return quantize_weight_fast if g is None else (lambda w: quantize_weight_grouped_fast(w, g))


def quantize_weights(weights: dict[str, torch.Tensor], cfg, progress: bool = False,
                     scheme: str = "w8a8") -> dict:
    """Return a copy of a canonical-name weight dict of ``cfg``'s model with the weights of
    quantisation ``scheme`` (``"w8a8"`` or ``"int8"``, see the module docstring) replaced by
    :class:`QuantWeight` (per-output-channel INT8). Weights that already are QuantWeight and
    other tensors are passed through. Raises ValueError for an unknown scheme."""
    is_int8 = models.spec_for_config(cfg).quantized_weight(scheme)
    quant = quantize_for(scheme)
    out: dict = {}
    for name, t in tqdm(weights.items(), desc="quantize", disable=None if progress else True):
        done = isinstance(t, (QuantWeight, GroupQuantWeight))
        out[name] = quant(t) if is_int8(name) and not done else t
    return out


def assemble_w8a8(tensors: dict[str, torch.Tensor], root: Path) -> dict:
    """Replace each stored ``X.weight`` int8 + ``X.weight_scale`` float32 pair of a W8A8
    checkpoint by a :class:`QuantWeight`. Raises CheckpointError for a non-positive scale."""
    out: dict = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        if isinstance(t, torch.Tensor) and t.dtype == torch.int8:
            scale = tensors[name + "_scale"]
            if not bool((scale.float() > 0).all()):
                raise CheckpointError(f"checkpoint {root}: tensor {name}_scale has non-positive entries")
            if scale.dim() == 2:  # group-scaled: float16 [out, in/G] (read as float32: exact)
                out[name] = GroupQuantWeight(t, scale.to(torch.float16), t.shape[1] // scale.shape[1])
            else:
                out[name] = QuantWeight(t, scale.float())
        else:
            out[name] = t
    return out
