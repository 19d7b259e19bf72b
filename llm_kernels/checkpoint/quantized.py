"""The W8A8 checkpoint format: per-output-channel INT8 weights with float32 scales.

A W8A8 checkpoint is an HF directory like the float one, with ``config.json`` carrying
``quantization_config = {"quant_method": "llm_kernels_w8a8", ...}`` and, for every weight
named by the model's ``is_w8a8_weight`` (DeepSeek-V4: wq_b, wo_b, indexer wq_b, shared and
routed experts; Qwen3: the seven projections of each layer), ``<name>`` stored as int8 ``[out, in]`` plus ``<name>_scale`` float32 ``[out]``.
All other tensors are stored as in the source checkpoint.

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (recipe and storage table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..numerics.quant import QuantWeight, quantize_weight
from .. import models
from .names import QUANT_METHOD_W8A8

__all__ = ["quantize_weights", "quantize_checkpoint", "QUANTIZATION_CONFIG"]

QUANTIZATION_CONFIG = {
    "quant_method": QUANT_METHOD_W8A8,
    "weights": "int8, symmetric, per output channel, float32 scale (<name>_scale)",
    "activations": "int8, symmetric, dynamic per token (amax clamped at 1e-4, round half to even)",
}


def quantize_weights(weights: dict[str, torch.Tensor], cfg, progress: bool = False) -> dict:
    """Return a copy of a canonical-name float weight dict of ``cfg``'s model with its W8A8
    weights (the spec's ``is_w8a8_weight``) replaced by :class:`QuantWeight`
    (per-output-channel INT8). Other tensors are passed through."""
    is_w8a8 = models.spec_for_config(cfg).is_w8a8_weight
    out: dict = {}
    for name, t in tqdm(weights.items(), desc="quantize", disable=None if progress else True):
        out[name] = quantize_weight(t) if is_w8a8(name) and not isinstance(t, QuantWeight) else t
    return out


def quantize_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a float HF checkpoint directory to the W8A8 format in ``out_dir``.

    Raises CheckpointError/ConfigError as :func:`load_checkpoint` does for a bad source, and
    CheckpointError when the source is already W8A8."""
    from ..errors import CheckpointError
    from .safetensors_io import checkpoint_quant, load_checkpoint

    if checkpoint_quant(src) is not None:
        raise CheckpointError(f"{src} is already a W8A8 checkpoint")
    cfg, weights = load_checkpoint(src, dtype=None, progress=progress)
    q = quantize_weights(weights, cfg, progress=progress)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if isinstance(t, QuantWeight):
            tensors[name] = t.qweight.contiguous()
            tensors[name + "_scale"] = t.scale.float().contiguous()
        else:
            tensors[name] = t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    conf = json.loads((Path(src) / "config.json").read_text())
    qc = dict(QUANTIZATION_CONFIG, modules=list(models.spec_for_config(cfg).w8a8_modules))
    conf["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return out
