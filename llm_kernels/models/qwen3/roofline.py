"""Memory-bandwidth roofline of one Qwen3 decoder layer's decode step: bytes moved per stage.

A decode step of ``B`` sequences (one new token each, every sequence holding ``L`` cached
tokens) streams every weight of the layer once and reads each sequence's K/V cache once,
so its ideal time is ``bytes / DRAM bandwidth``. This module counts those bytes per stage
of :data:`llm_kernels.runtime.qwen3_engine.STAGES` (names repeated here as :data:`STAGES`,
so the byte model needs no torch).

Notation: ``D`` = hidden_size, ``I`` = intermediate_size, ``nq``/``nkv`` = query / K-V
heads, ``d`` = head_dim, ``Q = nq·d``, ``KV = nkv·d``; ``a`` = activation itemsize
(default 2: rows are stored as bf16), ``c`` = KV-cache itemsize (2 for the bf16 cache).

Weights (read once per step whatever ``B``):

* ``bf16``: 2 B per parameter for the 7 projections and the 4 norm vectors;
* ``w8a8``: the 7 projections ``q,k,v,o,gate,up,down`` INT8 (1 B/param) plus one FP32
  scale per output channel (``4·out`` B); the norms stay bf16 (2 B/param)
  (:mod:`llm_kernels.models.qwen3.weights`: ``W8A8_WEIGHT_RE``).

Per stage (``B`` rows):

=========================  ==================================  ======================================
stage                      weights                             cache / activations
=========================  ==================================  ======================================
``input_norm_qkv``         input_layernorm [D]; q [Q,D],       act: x in ``B·D·a``; q,k,v out
                           k, v [KV,D]                         ``B·(Q+2·KV)·a``
``qk_norm_rope``           q_norm, k_norm [d]                  KV write ``B·2·KV·c``; act: q,k,v in
                                                               ``B·(Q+2·KV)·a``, cos/sin ``2·B·d·a``,
                                                               q out ``B·Q·a``
``attention``              —                                   KV read ``B·(L+1)·2·KV·c`` (the L
                                                               cached rows and the new row just
                                                               written); act: q in, out ``2·B·Q·a``
``o_proj_residual_norm``   o_proj [D,Q]; post_attention_       act: attn in ``B·Q·a``, residual in,
                           layernorm [D]                       h out, norm out ``3·B·D·a``
``gate_up_swiglu``         gate, up [I,D]                      act: in ``B·D·a``, out ``B·I·a``
``down_residual``          down [D,I]                          act: in ``B·I·a``, residual in, out
                                                               ``2·B·D·a``
=========================  ==================================  ======================================

Block-table and position reads (a few bytes per sequence) are ignored. The attention
stage's own roofline is its KV read (:func:`kv_read_bytes`): at ``L = 4096``, Qwen3-32B
reads ``4097·2·8·128·2 = 16.8 MB`` per sequence and layer, vs 0.97 GB (bf16) / 0.49 GB
(W8A8) of weights for the whole layer.

% of roofline (:func:`roofline_pct`) = ``100 · (bytes / bandwidth) / measured seconds``
with the bandwidth measured in the same run (``measure_dram_bandwidth``).
Source: the stage signatures of ``llm_kernels.runtime.qwen3_engine`` and the cache layout of
``llm_kernels.runtime.paged_cache``; method as :mod:`llm_kernels.models.deepseek_v4.roofline`.
"""

from __future__ import annotations

from ...bench.roofline import StageBytes, TensorBytes, roofline_pct, roofline_seconds
from .config import Qwen3Config

__all__ = [
    "trace_stage_bytes", "PROJECTIONS",
    "QUANT_MODES",
    "STAGES",
    "kv_read_bytes",
    "kv_write_bytes",
    "layer_breakdown",
    "layer_bytes",
    "layer_weight_bytes",
    "roofline_pct",
    "roofline_seconds",
    "stage_breakdown",
    "stage_bytes",
    "weight_table",
]

#: ``release`` (a Qwen3-FP8 release loaded natively: FP8 -> int8_g32) counts as ``int8_g32``.
QUANT_MODES = ("bf16", "w8a8", "int8", "int8_g32", "release")
STAGES = ("input_norm_qkv", "qk_norm_rope", "attention", "o_proj_residual_norm", "gate_up_swiglu",
          "down_residual")
# the seven W8A8 projections (transformers names under model.layers.{i}.)
PROJECTIONS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")

FP32, BF16, INT8 = 4, 2, 1


def _check(quant: str, B: int, L: int) -> None:
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"batch B must be a positive integer, got {B!r}")
    if not isinstance(L, int) or L < 0:
        raise ValueError(f"context L must be an integer >= 0, got {L!r}")


def weight_table(cfg: Qwen3Config, quant: str = "bf16") -> list[TensorBytes]:
    """Every weight of one Qwen3 decoder layer as the decode step reads it: name (without
    ``model.layers.{i}.``), stage, shape [out, in] / [n], dtype and bytes. ``w8a8``: the
    :data:`PROJECTIONS` are ``out·in`` INT8 + ``4·out`` FP32 scale bytes; everything else
    (and every tensor in ``bf16``) 2 B per element."""
    _check(quant, 1, 0)
    D, I, d, Q, KV = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.q_size, cfg.kv_size
    rows = [
        ("input_layernorm.weight", "input_norm_qkv", (D,)),
        ("self_attn.q_proj.weight", "input_norm_qkv", (Q, D)),
        ("self_attn.k_proj.weight", "input_norm_qkv", (KV, D)),
        ("self_attn.v_proj.weight", "input_norm_qkv", (KV, D)),
        ("self_attn.q_norm.weight", "qk_norm_rope", (d,)),
        ("self_attn.k_norm.weight", "qk_norm_rope", (d,)),
        ("self_attn.o_proj.weight", "o_proj_residual_norm", (D, Q)),
        ("post_attention_layernorm.weight", "o_proj_residual_norm", (D,)),
        ("mlp.gate_proj.weight", "gate_up_swiglu", (I, D)),
        ("mlp.up_proj.weight", "gate_up_swiglu", (I, D)),
        ("mlp.down_proj.weight", "down_residual", (D, I)),
    ]
    out = []
    for name, stage, shape in rows:
        n = 1
        for s in shape:
            n *= s
        if quant in ("int8_g32", "release") and name in PROJECTIONS:  # fp16 scale per 32 inputs
            out.append(TensorBytes(name, stage, "layer", shape, "int8+fp16/32 scales", n * INT8 + (n // 32) * 2))
        elif quant in ("w8a8", "int8") and name in PROJECTIONS:
            out.append(TensorBytes(name, stage, "layer", shape, "int8+fp32 scale", n * INT8 + shape[0] * FP32))
        else:
            out.append(TensorBytes(name, stage, "layer", shape, "bf16", n * BF16))
    return out


def layer_weight_bytes(cfg: Qwen3Config, quant: str = "bf16") -> int:
    """Σ weight bytes of one layer: ``2·(P + 2D + 2d)`` in bf16, ``P + 4·(Q + 2KV + D + 2I + D)
    + 2·(2D + 2d)`` in w8a8, with ``P = (Q+2KV)·D + D·Q + 3·I·D`` projection parameters.
    Qwen3-32B: 975,196,672 B bf16; 487,895,552 B w8a8."""
    return sum(t.nbytes for t in weight_table(cfg, quant))


def kv_read_bytes(cfg: Qwen3Config, B: int, L: int, kv_itemsize: int = BF16) -> int:
    """K and V bytes the attention of one decode step reads: ``B·(L+1)·2·nkv·d·c`` (each of
    the B sequences attends over its L cached tokens plus the new one)."""
    _check("bf16", B, L)
    return B * (L + 1) * 2 * cfg.kv_size * kv_itemsize


def kv_write_bytes(cfg: Qwen3Config, B: int, kv_itemsize: int = BF16) -> int:
    """K and V bytes written for B new tokens: ``B·2·nkv·d·c``."""
    _check("bf16", B, 0)
    return B * 2 * cfg.kv_size * kv_itemsize


def stage_breakdown(cfg: Qwen3Config, stage: str, B: int, L: int, quant: str = "bf16", *,
                    kv_itemsize: int = BF16, act_itemsize: int = BF16) -> StageBytes:
    """:class:`~llm_kernels.bench.roofline.StageBytes` (weights, cache, activations) of
    ``stage`` for one decode step of B sequences at context L (formulas in the module
    docstring). Raises ValueError for an unknown stage / quant or a bad B, L."""
    _check(quant, B, L)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    D, I, d, Q, KV = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.q_size, cfg.kv_size
    a = act_itemsize
    w = sum(t.nbytes for t in weight_table(cfg, quant) if t.stage == stage)
    cache = act = 0
    if stage == "input_norm_qkv":
        act = B * D * a + B * (Q + 2 * KV) * a
    elif stage == "qk_norm_rope":
        cache = kv_write_bytes(cfg, B, kv_itemsize)
        act = B * (Q + 2 * KV) * a + 2 * B * d * a + B * Q * a
    elif stage == "attention":
        cache = kv_read_bytes(cfg, B, L, kv_itemsize)
        act = 2 * B * Q * a
    elif stage == "o_proj_residual_norm":
        act = B * Q * a + 3 * B * D * a
    elif stage == "gate_up_swiglu":
        act = B * D * a + B * I * a
    else:  # down_residual
        act = B * I * a + 2 * B * D * a
    return StageBytes(w, cache, act)


def stage_bytes(cfg: Qwen3Config, stage: str, B: int, L: int, quant: str = "bf16", **kw) -> int:
    """Total bytes of ``stage`` (see :func:`stage_breakdown`; keywords ``kv_itemsize``,
    ``act_itemsize``)."""
    return stage_breakdown(cfg, stage, B, L, quant, **kw).total


def layer_breakdown(cfg: Qwen3Config, B: int, L: int, quant: str = "bf16", **kw) -> dict[str, StageBytes]:
    """{stage: StageBytes} for every stage of :data:`STAGES`, in order."""
    return {s: stage_breakdown(cfg, s, B, L, quant, **kw) for s in STAGES}


def layer_bytes(cfg: Qwen3Config, B: int, L: int, quant: str = "bf16", **kw) -> int:
    """Bytes of one layer's decode step: Σ over :data:`STAGES` (= weights of the layer +
    KV read + KV write + activations)."""
    return sum(b.total for b in layer_breakdown(cfg, B, L, quant, **kw).values())


def trace_stage_bytes(cfg, stage: str, layer_type: str | None, T: int, L: int, quant: str,
                      rows_per_seq: int = 1, **kw) -> int | None:
    """Bytes one traced stage slice reads (this module's decode-step byte model:
    T sequences of one new row each at context L); None for prefill slices (several rows
    per sequence, not modelled) and for stages the model does not count."""
    if stage not in STAGES or rows_per_seq != 1 or T < 1:
        return None
    return stage_bytes(cfg, stage, T, max(L, 1), quant)
