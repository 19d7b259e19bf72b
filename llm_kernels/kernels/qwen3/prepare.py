"""Load-time weight preparation for the fused Qwen3 kernels (``FUSED_OPS.prepare_weights``).

:func:`prepare_weights` runs once when the engine is built. Each fused projection stage
runs ONE GEMM over the concatenation of its weights, so the W8A8 weights of a layer are
packed per stage (:func:`.proj_common.prepare_stage`) and every weight is replaced by a
:class:`~llm_kernels.kernels.common.prepared.PackedRows` that points at its stage's shared
:class:`~.proj_common.ProjW8A8`:

* ``self_attn.q_proj/k_proj/v_proj`` -> ``input_norm_qkv`` (segments on 64-row chunks);
* ``self_attn.o_proj`` -> ``o_proj_residual_norm``;
* ``mlp.gate_proj/up_proj`` -> ``gate_up_swiglu`` (interleaved per 64-row chunk);
* ``mlp.down_proj`` -> ``down_residual``.

An INT8 ``lm_head`` (the ``int8`` scheme) -> :class:`PackedLinear`
(:func:`~llm_kernels.kernels.common.linear.prepare_linear`; read by :mod:`.head`). Float
weights, norms, the embedding and a float head are passed through (the bf16 GEMV reads
zero-copy views). The stage functions recognise the prepared members and run on the shared
pack; handed unprepared ``QuantWeight`` s they pack for the call.
"""

from __future__ import annotations

import re
from typing import Any

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.quant import QuantWeight
from ..common.linear import prepare_linear
from .group_stage import prepare_group_stage
from .proj_common import MODE_RES, MODE_SPLIT, MODE_SWIGLU, prepare_stage

__all__ = ["STAGE_WEIGHTS", "prepare_weights"]

#: (weights of one stage, in the stage function's order; stage mode)
STAGE_WEIGHTS = (
    (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), MODE_SPLIT),
    (("self_attn.o_proj.weight",), MODE_RES),
    (("mlp.gate_proj.weight", "mlp.up_proj.weight"), MODE_SWIGLU),
    (("mlp.down_proj.weight",), MODE_RES),
)

_LAYER = re.compile(r"^(model\.layers\.\d+\.)self_attn\.q_proj\.weight$")


def prepare_weights(weights: dict[str, Any], cfg: Any, consume: bool = False) -> dict[str, Any]:
    """A new dict: ``weights`` with each layer's W8A8 projection weights packed per stage
    (see the module docstring); a stage whose weights are not all ``QuantWeight`` is left
    as it is. Idempotent. ``cfg`` is not needed (the shapes come from the weights); it is
    the stage-table signature. The input dict is not modified unless ``consume``: then its
    entries are replaced by their prepared forms as these are made (each raw INT8 tensor
    is freed once packed, so the peak is the weights plus one stage's pack)."""
    out = dict(weights)
    if isinstance(weights.get("lm_head.weight"), (QuantWeight, GroupQuantWeight)):
        out["lm_head.weight"] = prepare_linear(weights["lm_head.weight"])
        if consume:
            weights["lm_head.weight"] = out["lm_head.weight"]
    layers = [m.group(1) for m in map(_LAYER.match, weights) if m is not None]
    for p in layers:
        for names, mode in STAGE_WEIGHTS:
            ws = tuple(weights.get(p + n) for n in names)
            if all(isinstance(w, GroupQuantWeight) for w in ws):  # group-scaled: one packed GEMM per stage
                for n, w in zip(names, prepare_group_stage(ws)):
                    out[p + n] = w
                    if consume:
                        weights[p + n] = w
            elif all(isinstance(w, QuantWeight) for w in ws):
                for n, w in zip(names, prepare_stage(ws, mode)):
                    out[p + n] = w
                    if consume:
                        weights[p + n] = w
            del ws
    return out
