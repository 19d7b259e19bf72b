"""The multi-token-prediction (MTP) block of DeepSeek-V4, stateless reference.

DeepSeek's ``inference/model.py`` ``MTPBlock.forward`` (spec §12.1; the depth-1 module of
the DeepSeek-V3 report, §2.2)::

    e = enorm(embed(input_ids))                          # [T, D]
    x = e_proj(e).unsqueeze(-2) + h_proj(hnorm(x))       # x: main HC stream [T, HC, D]
    x = Block.forward(x)                                 # an ordinary SWA layer, layer_id = L
    logits = head(hc_head(x; mtp hc_head_*), mtp norm)   # the shared lm_head

Row ``i`` combines the main model's final HC stream at position ``i`` (before ``hc_head``)
with the embedding of token ``i + 1`` and predicts token ``i + 2``; its attention runs over
the MTP layer's own sliding window at position ``i`` (RoPE position ``i``). Embedding and head
are the main model's; ``hnorm`` is applied per HC lane. Roundings follow the main layers':
each projection's output is stored in ``dtype`` and their sum is rounded once more.
"""

from __future__ import annotations

import torch

from ...models.deepseek_v4.config import DeepSeekV4Config
from ...numerics.linear import linear
from ...numerics.rounding import rnd
from .common import rms_norm
from .hc import hc_head
from .model import LayerWeights, attention_sublayer, moe_sublayer

__all__ = ["mtp_weights", "mtp_input", "mtp_logits_head", "forward_mtp"]


def mtp_weights(weights: dict[str, torch.Tensor], k: int = 0) -> LayerWeights:
    """The view of MTP block ``k``'s tensors (``mtp.{k}.<name>``)."""
    return LayerWeights(weights, -1, prefix=f"mtp.{k}.")


def mtp_input(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, mw: LayerWeights, x_hc: torch.Tensor,
              next_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``e_proj(enorm(embed(next_ids)))`` broadcast over the HC lanes plus
    ``h_proj(hnorm(x_hc))`` per lane: x_hc [T, HC, D], next_ids [T] -> [T, HC, D] (``dtype``
    values). Raises ValueError for an id outside [0, vocab_size) or mismatched rows."""
    T, HC, D = x_hc.shape
    ids = next_ids.long()
    if ids.shape != (T,):
        raise ValueError(f"next_ids must be [{T}] (one per x_hc row), got {tuple(ids.shape)}")
    if T and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise ValueError(f"next_ids must lie in [0, {cfg.vocab_size}), got min {int(ids.min())} max {int(ids.max())}")
    e = rnd(weights["embed.weight"][ids].float(), dtype)
    e = rms_norm(e, mw["enorm.weight"], cfg.rms_norm_eps, dtype)
    h = rms_norm(x_hc, mw["hnorm.weight"], cfg.rms_norm_eps, dtype)
    pe = linear(e, mw["e_proj.weight"], dtype)                                    # [T, D]
    ph = linear(h.reshape(T * HC, D), mw["h_proj.weight"], dtype).view(T, HC, D)  # per lane
    return rnd(pe.unsqueeze(1) + ph, dtype)


def mtp_logits_head(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, mw: LayerWeights,
                    x_hc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block's own ``hc_head`` and final norm, then the shared head: [T, HC, D] -> logits
    [T, V] float32."""
    y = hc_head(x_hc, mw["hc_head_fn"], mw["hc_head_scale"], mw["hc_head_base"], hc_eps=cfg.hc_eps,
                rms_eps=cfg.rms_norm_eps, dtype=dtype)
    y = rms_norm(y, mw["norm.weight"], cfg.rms_norm_eps, dtype)
    return linear(y, weights["head.weight"], dtype)


def forward_mtp(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, x_hc: torch.Tensor,
                input_ids: torch.Tensor, k: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draft logits of MTP block ``k`` over one whole sequence from position 0.

    Args:
        x_hc: the main model's final HC stream [T, HC, D] of ``input_ids``
            (:func:`~.model.hidden_states`).
        input_ids: the sequence [T].
    Returns float32 logits [T - 1, V]: row ``i`` (position ``i``, fed ``x_hc[i]`` and
    ``input_ids[i + 1]``) predicts token ``i + 2``. Raises IndexError when ``cfg`` has no
    MTP block ``k``, ValueError for mismatched shapes."""
    layer = cfg.mtp_layer(k)
    if x_hc.shape[0] != input_ids.shape[0]:
        raise ValueError(f"x_hc has {x_hc.shape[0]} rows but input_ids {input_ids.shape[0]}")
    mw = mtp_weights(weights, k)
    nxt = input_ids[1:]
    x = mtp_input(weights, cfg, mw, x_hc[:-1], nxt, dtype)
    x = attention_sublayer(mw, cfg, layer, x, dtype)
    x = moe_sublayer(mw, cfg, layer, x, nxt, dtype)
    return mtp_logits_head(weights, cfg, mw, x, dtype)
