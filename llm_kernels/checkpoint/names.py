"""Checkpoint tensor tables through the model registry: what a checkpoint of ``cfg`` must
hold (float or W8A8), and the per-model naming rules (canonical names, ignored tensors,
tensors kept in float32). The tables themselves live in ``models/<name>/weights.py``.
"""

from __future__ import annotations

from .. import models
from .tensor_info import TensorInfo

__all__ = ["TensorInfo", "expected_tensors", "canonical_name", "is_ignored", "is_fp32_tensor",
           "is_w8a8_weight", "QUANT_METHOD_W8A8", "QUANT_METHOD_INT8", "QUANT_METHOD_INT8_G32", "QUANT_METHODS",
           "QUANTS", "GROUPED_SCHEMES"]

QUANT_METHOD_W8A8 = "llm_kernels_w8a8"
QUANT_METHOD_INT8 = "llm_kernels_int8"
QUANT_METHOD_INT8_G32 = "llm_kernels_int8_g32"
#: quantisation scheme -> ``quantization_config.quant_method`` of its stored checkpoints.
#: ``w8a8``: the spec's W8A8 set (the model's ``is_w8a8_weight``); ``int8``: every 2-D
#: weight a Q8-class format quantises (``is_int8_weight``), same per-row recipe;
#: ``int8_g32``: the ``int8`` set with one scale per 32 inputs (weights: float16
#: ``[out, in/32]``; activations per 32 at run time: Q8_0's granularity).
QUANT_METHODS = {"w8a8": QUANT_METHOD_W8A8, "int8": QUANT_METHOD_INT8, "int8_g32": QUANT_METHOD_INT8_G32}
QUANTS = (None, "w8a8", "int8", "int8_g32")
#: Group-scaled schemes -> inputs per scale.
GROUPED_SCHEMES = {"int8_g32": 32}


def canonical_name(name: str, cfg) -> str:
    """The canonical name of stored tensor ``name`` for ``cfg``'s model (e.g. transformers'
    ``save_pretrained`` names mapped back to DeepSeek's release names)."""
    return models.spec_for_config(cfg).canonical_name(name)


def is_ignored(name: str, cfg) -> bool:
    """True for stored tensors ``cfg``'s model does not use (DeepSeek-V4's ``mtp.*`` when
    ``cfg`` has no MTP block)."""
    return models.spec_for_config(cfg).is_ignored(name, cfg)


def is_fp32_tensor(name: str, cfg) -> bool:
    """True when canonical ``name`` is kept in float32 at any compute dtype."""
    return models.spec_for_config(cfg).is_fp32_tensor(name)


def is_w8a8_weight(name: str, cfg) -> bool:
    """True for the canonical weights stored INT8 in the W8A8 format."""
    return models.spec_for_config(cfg).is_w8a8_weight(name)


def expected_tensors(cfg, quant: str | None = None) -> dict[str, TensorInfo]:
    """Every tensor a checkpoint of ``cfg`` must hold, by canonical name, with its shape.
    ``quant="w8a8"`` / ``"int8"``: the scheme's INT8 weights are kind ``"int8"`` and each
    has a ``<name>_scale`` ([out] float32) companion; ``"int8_g32"``: ``<name>_scale`` is
    ``[out, in/32]`` (float16). Raises ValueError for another ``quant``."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    spec = models.spec_for_config(cfg)
    t = spec.expected_float_tensors(cfg)
    if quant is None:
        return t
    is_int8 = spec.quantized_weight(quant)
    out: dict[str, TensorInfo] = {}
    for name, info in t.items():
        if is_int8(name):
            out[name] = TensorInfo(info.shape, kind="int8")
            g = GROUPED_SCHEMES.get(quant)
            out[name + "_scale"] = TensorInfo((info.shape[0],) if g is None else (info.shape[0], info.shape[1] // g))
        else:
            out[name] = info
    return out
