"""Whole-model DeepSeek-V4 reference: embedding, HC streams through the layers,
``hc_head``, final norm, ``lm_head``. Stateless: :func:`forward` runs one whole sequence
from position 0 (no caches), and is the readable ground truth the cached runtime
(:mod:`llm_kernels.runtime`) and the fast kernels are checked against.

Spec: ``shared/design/deepseek_v4_architecture.md`` §2 (data flow), §9.1 (attended sets).
"""

from __future__ import annotations

import torch

from ...models.deepseek_v4.config import CSA, HCA, SLIDING, DeepSeekV4Config
from ...numerics.linear import linear
from ...numerics.group_quant import GroupQuantWeight
from ...numerics.quant import QuantWeight
from ...numerics.rounding import rnd
from .common import rms_norm, rope_cos_sin
from .compressor import compress_windows, compressor_project
from .hc import hc_head, hc_post, hc_pre
from .indexer import (
    indexer_keys_int8,
    indexer_query,
    indexer_query_int8,
    indexer_scores,
    indexer_scores_int8,
    indexer_topk,
)
from .moe import gate, moe
from .qkv_proj_rope import qkv_proj_rope
from .sparse_attn import sparse_attn

__all__ = ["LayerWeights", "embed", "attention_prologue", "moe_sublayer", "logits_head", "forward",
           "hidden_states", "window_indices", "attention_sublayer"]


class LayerWeights:
    """Read-only view of one layer's tensors in a canonical-name weight dict
    (``layers.{i}.<name>``, or ``prefix`` such as ``mtp.0.`` for an MTP block);
    ``lw["attn.wq_a.weight"]`` or ``lw.get(name)`` (None if absent)."""

    def __init__(self, weights: dict[str, torch.Tensor], layer: int, prefix: str | None = None):
        self._w, self._p = weights, prefix if prefix is not None else f"layers.{layer}."
        self._experts: dict[int, list] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._p + name
        if key not in self._w:
            raise KeyError(f"weight {key!r} is missing")
        return self._w[key]

    def get(self, name: str) -> torch.Tensor | None:
        return self._w.get(self._p + name)

    def experts(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(w1, w3, w2)]`` of routed experts ``0 … n-1``; built once per view (the weight
        dict is not changed after load). Raises KeyError for a missing tensor."""
        ex = self._experts.get(n)
        if ex is None:
            ex = self._experts[n] = [(self[f"ffn.experts.{e}.w1.weight"], self[f"ffn.experts.{e}.w3.weight"],
                                      self[f"ffn.experts.{e}.w2.weight"]) for e in range(n)]
        return ex


def embed(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, input_ids: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    """Token embedding copied into every HC stream: input_ids [T] -> x_hc [T, HC, D].
    Raises ValueError for an id outside [0, vocab_size)."""
    ids = input_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got min {int(ids.min())} "
                         f"max {int(ids.max())}")
    x = rnd(weights["embed.weight"][ids].float(), dtype)
    return x.unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()


def _hc_kwargs(cfg: DeepSeekV4Config) -> dict:
    return dict(hc_mult=cfg.hc_mult, sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                rms_eps=cfg.rms_norm_eps)


def attention_prologue(lw: LayerWeights, cfg: DeepSeekV4Config, layer: int, x_hc: torch.Tensor,
                       positions: torch.Tensor, dtype: torch.dtype):
    """hc_pre -> attn_norm -> qkv_proj_rope for the attention sublayer of ``layer``.

    Returns (xn [T,D], q [T,H,HD], kv [T,HD], q_residual [T,QL], post, comb, cos, sin) with
    cos/sin [T, RD/2] of the layer's RoPE profile at ``positions``."""
    x_mixed, post, comb = hc_pre(x_hc, lw["hc_attn_fn"], lw["hc_attn_scale"], lw["hc_attn_base"],
                                 **_hc_kwargs(cfg), dtype=dtype)
    xn = rms_norm(x_mixed, lw["attn_norm.weight"], cfg.rms_norm_eps, dtype)
    cos, sin = rope_cos_sin(cfg.rope_for_layer(layer), cfg.qk_rope_head_dim, positions, dtype)
    q, kv, q_res = qkv_proj_rope(xn, lw["attn.wq_a.weight"], lw["attn.q_norm.weight"],
                                 lw["attn.wq_b.weight"], lw["attn.wkv.weight"], lw["attn.norm.weight"],
                                 cos, sin, num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                                 eps=cfg.rms_norm_eps, dtype=dtype)
    return xn, q, kv, q_res, post, comb, cos, sin


def moe_sublayer(lw: LayerWeights, cfg: DeepSeekV4Config, layer: int, x_hc: torch.Tensor,
                 input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """hc_pre -> ffn_norm -> gate -> shared + routed experts -> hc_post. x_hc [T,HC,D] ->
    [T,HC,D]."""
    x_mixed, post, comb = hc_pre(x_hc, lw["hc_ffn_fn"], lw["hc_ffn_scale"], lw["hc_ffn_base"],
                                 **_hc_kwargs(cfg), dtype=dtype)
    xn = rms_norm(x_mixed, lw["ffn_norm.weight"], cfg.rms_norm_eps, dtype)
    hash_layer = cfg.is_hash_layer(layer)
    w, idx = gate(xn, lw["ffn.gate.weight"], None if hash_layer else lw["ffn.gate.bias"],
                  lw["ffn.gate.tid2eid"] if hash_layer else None, input_ids,
                  top_k=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func,
                  norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                  dtype=dtype)
    shared = (lw["ffn.shared_experts.w1.weight"], lw["ffn.shared_experts.w3.weight"],
              lw["ffn.shared_experts.w2.weight"])
    y = moe(xn, w, idx, lw.experts(cfg.n_routed_experts), shared, swiglu_limit=cfg.swiglu_limit,
            dtype=dtype)
    return hc_post(y, x_hc, post, comb, dtype)


def logits_head(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, x_hc: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """hc_head -> final RMSNorm -> lm_head: x_hc [T,HC,D] -> logits [T,V] float32."""
    y = hc_head(x_hc, weights["hc_head_fn"], weights["hc_head_scale"], weights["hc_head_base"],
                hc_eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps, dtype=dtype)
    y = rms_norm(y, weights["norm.weight"], cfg.rms_norm_eps, dtype)
    return linear(y, weights["head.weight"], dtype)


def window_indices(positions: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window rows for whole-sequence attention: query at position p attends
    positions max(0, p-window+1) … p. Returns [T, window] int64 (oldest first, -1 padded),
    indexing a pool whose row r holds position r."""
    offs = torch.arange(-window + 1, 1)
    idx = positions.long().view(-1, 1) + offs.view(1, -1)
    return torch.where(idx >= 0, idx, torch.full_like(idx, -1))


def _windows(kv: torch.Tensor, score: torch.Tensor, ratio: int):
    n = kv.shape[0] // ratio
    return (kv[: n * ratio].view(n, ratio, kv.shape[-1]), score[: n * ratio].view(n, ratio, score.shape[-1]), n)


def _compress_all(lwc, cfg, xn, positions, layer, overlap, dtype, prefix):
    """Whole-sequence compressor: every complete window of the sequence -> entries [n, d]."""
    ratio = cfg.compress_ratio(layer)
    kv, score = compressor_project(xn, lwc(prefix + "wkv.weight"), lwc(prefix + "wgate.weight"),
                                   lwc(prefix + "ape"), positions, dtype)
    kvw, sw, n = _windows(kv, score, ratio)
    d = kv.shape[-1] // (2 if overlap else 1)
    if n == 0:
        return torch.zeros(0, d)
    prev_kv = prev_score = None
    if overlap:
        prev_kv = torch.cat([torch.zeros(1, ratio, d), kvw[:-1, :, :d]], dim=0)
        prev_score = torch.cat([torch.full((1, ratio, d), float("-inf")), sw[:-1, :, :d]], dim=0)
    cos, sin = rope_cos_sin(cfg.rope_compress, cfg.qk_rope_head_dim, torch.arange(n) * ratio, dtype)
    return compress_windows(kvw, sw, prev_kv, prev_score, lwc(prefix + "norm.weight"), cos, sin,
                            overlap=overlap, eps=cfg.rms_norm_eps, dtype=dtype)


def attention_sublayer(lw: LayerWeights, cfg: DeepSeekV4Config, layer: int, x_hc: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Whole-sequence attention sublayer of ``layer`` (positions 0..T-1): hc_pre -> attn_norm
    -> qkv_proj_rope -> compressor / indexer -> sparse_attn -> hc_post. x_hc [T,HC,D] ->
    [T,HC,D]."""
    T = x_hc.shape[0]
    positions = torch.arange(T)
    xn, q, kv, q_res, post, comb, cos, sin = attention_prologue(lw, cfg, layer, x_hc, positions, dtype)
    idx = window_indices(positions, cfg.sliding_window)
    pool = kv
    lt = cfg.layer_type(layer)
    if lt != SLIDING:
        ratio = cfg.compress_ratio(layer)
        entries = _compress_all(lambda n: lw[n], cfg, xn, positions, layer, lt == CSA, dtype,
                                "attn.compressor.")
        n = entries.shape[0]
        pool = torch.cat([kv, entries], dim=0)
        if lt == HCA:
            c = torch.arange(n).view(1, -1).expand(T, -1)
            comp = torch.where(c < ((positions + 1) // ratio).view(-1, 1), c + T, torch.full_like(c, -1))
        else:
            keys = _compress_all(lambda n_: lw[n_], cfg, xn, positions, layer, True, dtype,
                                 "attn.indexer.compressor.")
            icos, isin = rope_cos_sin(cfg.rope_compress, cfg.qk_rope_head_dim, positions, dtype)
            wq_b = lw["attn.indexer.wq_b.weight"]
            args = (q_res, xn, wq_b, lw["attn.indexer.weights_proj.weight"], icos, isin)
            kw = dict(n_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim, dtype=dtype)
            if isinstance(wq_b, (QuantWeight, GroupQuantWeight)):  # INT8: Hadamard + INT8 indexer (spec §8)
                qi8, qs, wi = indexer_query_int8(*args, **kw)
                scores = indexer_scores_int8(qi8, qs, wi, *indexer_keys_int8(keys))
            else:
                qi, wi = indexer_query(*args, **kw)
                scores = indexer_scores(qi, wi, keys)
            top = indexer_topk(scores, positions, ratio, cfg.index_topk)
            comp = torch.where(top >= 0, top + T, top)
        idx = torch.cat([idx, comp], dim=1)
    out = sparse_attn(q, pool, idx, lw["attn.attn_sink"], cos, sin, lw["attn.wo_a.weight"],
                      lw["attn.wo_b.weight"], o_groups=cfg.o_groups, softmax_scale=cfg.softmax_scale,
                      dtype=dtype)
    return hc_post(out, x_hc, post, comb, dtype)


def hidden_states(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, input_ids: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The HC stream after the last decoder layer, [T, HC, D] (``dtype`` values), of one
    sequence ``input_ids`` [T] from position 0: what ``hc_head`` reads, and what the MTP
    block reads as its ``x`` (spec §12.1)."""
    x_hc = embed(weights, cfg, input_ids, dtype)
    for layer in range(cfg.num_hidden_layers):
        lw = LayerWeights(weights, layer)
        x_hc = attention_sublayer(lw, cfg, layer, x_hc, dtype)
        x_hc = moe_sublayer(lw, cfg, layer, x_hc, input_ids, dtype)
    return x_hc


def forward(weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config, input_ids: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [T, V] float32 of one sequence ``input_ids`` [T] starting at position 0.

    ``weights`` is a canonical-name dict (``llm_kernels.checkpoint.load_checkpoint``);
    ``dtype`` is the activation storage dtype (float32 or bfloat16)."""
    return logits_head(weights, cfg, hidden_states(weights, cfg, input_ids, dtype), dtype)
