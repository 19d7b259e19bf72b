"""Memory-bandwidth roofline of one DeepSeek-V4 decode step: bytes moved per stage.

A decode step at this batch size is weight-bandwidth bound (spec §14.4), so its ideal time
is ``bytes / DRAM bandwidth``. This module counts the bytes a kernel must move for each
stage of one decoder layer (and the LM head) given a config, ``T`` token rows, the context
length ``L`` and a storage mode:

* ``"w8a8"``: pypto's kernel ABI of spec §14 — INT8 (+ one FP32 scale per output row) for
  ``wq_b``, ``wo_b``, the indexer ``wq_b``, the shared and routed experts; BF16 for
  ``wq_a``, ``wkv``, ``wo_a``, the compressor / indexer-compressor ``wkv``/``wgate``,
  ``weights_proj``, the Hadamard matrix, the norm weights and the LM head; FP32 for the HC
  parameters, ``attn_sink``, the gate weight and bias and the compressor ``ape``.
* ``"int8"``: the ``int8`` scheme (:mod:`llm_kernels.checkpoint.quantized`): ``"w8a8"``
  plus ``wq_a``, ``wkv``, ``wo_a``, the compressors' ``wkv``/``wgate``, ``weights_proj``
  and the LM head INT8 (+ FP32 per-row scales).
* ``"bf16"``: the same with every INT8 tensor stored as BF16 (no scales, no Hadamard).

Bytes per stage = weights (every weight of the stage is read once per step, whatever
``T``; routed experts: ``E_act`` distinct experts, default ``min(E, T·K)``) + cache traffic
(window KV rows, compressed rows, indexer keys, compressor state rows) + activations
(stage inputs and outputs at their storage dtype, small at decode).

Row layout: ``T = B · S`` rows, ``B = T / rows_per_seq`` sequences of ``S = rows_per_seq``
new tokens each, every sequence at context ``L`` (its new tokens sit at positions
``L … L+S-1``). Cache reads are per sequence (shared by its S rows).

Cache model (spec §14.3-§14.4, BF16 KV rows of ``head_dim·2`` bytes):

* window: ``min(L, W-1) + S`` raw rows read per sequence (the query's own row included:
  128 rows at W = 128), ``S`` rows written;
* HCA: every visible compressed row, ``(L+S) // 128``;
* CSA: ``min(S·index_topk, (L+S) // 4)`` compressed rows (top-k union over the S rows) and
  all ``(L+S) // 4`` indexer keys (``IHD`` INT8 + FP32 scale in w8a8, ``IHD`` BF16 in bf16);
* compressor state: each new token writes one FP32 state row (``kv ‖ score``, ``coff·d·2·4``
  bytes); the state read when a window closes (``2·ratio`` rows with overlap, ``ratio``
  without) and the emitted entry are *amortised* per token (``/ratio``), so a step's count
  does not depend on whether it happens to close a window.

Spec: ``shared/design/deepseek_v4_architecture.md`` §14 (tables checked in
``tests/bench/test_bench.py``).
"""

from __future__ import annotations

from ...bench.roofline import (
    BF16,
    FP32,
    INT8,
    StageBytes,
    TensorBytes,
    roofline_pct,
    roofline_seconds,
)
from .config import CSA, HCA, SLIDING, DeepSeekV4Config

__all__ = [
    "trace_stage_bytes", "QUANT_MODES", "STAGES", "LAYER_STAGES", "LAYER_TYPE_ALIASES", "TensorBytes", "StageBytes",
    "layer_type_name", "weight_table", "weight_parts", "stage_breakdown", "stage_bytes",
    "layer_bytes", "layer_breakdown", "lm_head_bytes", "model_dense_weight_bytes",
    "experts_active_default", "roofline_seconds", "roofline_pct",
]

#: ``release``: a release checkpoint as loaded natively (routed experts MXFP4: 4 bits + one
#: UE8M0 byte per 32 weights; every other INT8-set weight int8_g32).
QUANT_MODES = ("bf16", "w8a8", "int8", "int8_g32", "release")
STAGES = ("hc_pre", "qkv_proj_rope", "compressor", "indexer", "sparse_attn", "hc_post", "gate", "moe",
          "lm_head")
LAYER_STAGES = STAGES[:-1]
LAYER_TYPE_ALIASES = {"swa": SLIDING, "csa": CSA, "hca": HCA, SLIDING: SLIDING, CSA: CSA, HCA: HCA}


def layer_type_name(layer_type: str) -> str:
    """Full layer type (``sliding_attention`` …) from a full name or ``swa``/``csa``/``hca``.
    Raises ValueError for anything else."""
    try:
        return LAYER_TYPE_ALIASES[layer_type]
    except KeyError:
        raise ValueError(f"layer type must be one of swa, csa, hca (or the full names), got {layer_type!r}") from None


def _check_quant(quant: str) -> None:
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _t(name, stage, part, shape, kind: str, quant: str) -> TensorBytes:
    """kind: fp32 | bf16 | q (INT8 + FP32 per-output-row scale in w8a8 and int8, INT8 + an
    FP16 scale per 32 inputs in int8_g32, BF16 in bf16) | q8 (INT8 in int8 / int8_g32 only,
    else BF16) | qx (a routed expert: MXFP4 in release, else as q). ``release`` is int8_g32
    for everything but the routed experts."""
    n = _prod(shape)
    if kind == "qx":
        if quant == "release":
            return TensorBytes(name, stage, part, shape, "mxfp4+ue8m0/32", n // 2 + n // 32)
        kind = "q"
    if quant == "release":
        quant = "int8_g32"
    if kind == "fp32":
        return TensorBytes(name, stage, part, shape, "fp32", n * FP32)
    if kind == "bf16" or quant == "bf16" or (kind == "q8" and quant not in ("int8", "int8_g32")):
        return TensorBytes(name, stage, part, shape, "bf16", n * BF16)
    if quant == "int8_g32":
        return TensorBytes(name, stage, part, shape, "int8+fp16/32 scales", n * INT8 + (n // 32) * 2)
    return TensorBytes(name, stage, part, shape, "int8+fp32 scale", n * INT8 + shape[0] * FP32)


def weight_table(cfg: DeepSeekV4Config, layer_type: str, quant: str = "w8a8", *,
                 hash_layer: bool = False) -> list[TensorBytes]:
    """Every weight of one decoder layer of ``layer_type`` in the kernel layout of ``quant``,
    routed experts as ONE expert (``part="routed_expert"``, three tensors).

    ``hash_layer``: a hash-routed MoE layer has no gate bias (its ``tid2eid`` rows are
    gathered per token and counted as cache traffic by :func:`stage_breakdown`). The spec §14
    tables count the bias on every layer (the default)."""
    _check_quant(quant)
    lt = layer_type_name(layer_type)
    D, H, HD, QL = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    G, OL, HC, MIX = cfg.o_groups, cfg.o_lora_rank, cfg.hc_mult, cfg.mix_hc
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    IH, IHD = cfg.index_n_heads, cfg.index_head_dim
    q = quant
    ac, me = "attention_common", "moe_dense"
    t = [
        _t("hc_attn_fn", "hc_pre", ac, (MIX, HC * D), "fp32", q),
        _t("hc_attn_scale", "hc_pre", ac, (3,), "fp32", q),
        _t("hc_attn_base", "hc_pre", ac, (MIX,), "fp32", q),
        _t("attn_norm.weight", "qkv_proj_rope", ac, (D,), "bf16", q),
        _t("attn.wq_a.weight", "qkv_proj_rope", ac, (QL, D), "q8", q),
        _t("attn.q_norm.weight", "qkv_proj_rope", ac, (QL,), "bf16", q),
        _t("attn.wq_b.weight", "qkv_proj_rope", ac, (H * HD, QL), "q", q),
        _t("attn.wkv.weight", "qkv_proj_rope", ac, (HD, D), "q8", q),
        _t("attn.norm.weight", "qkv_proj_rope", ac, (HD,), "bf16", q),
        _t("attn.attn_sink", "sparse_attn", ac, (H,), "fp32", q),
        _t("attn.wo_a.weight", "sparse_attn", ac, (G * OL, H * HD // G), "q8", q),
        _t("attn.wo_b.weight", "sparse_attn", ac, (D, G * OL), "q", q),
    ]
    if lt != SLIDING:
        ratio = dict(cfg.compress_rates)[lt]
        coff = 2 if lt == CSA else 1
        part = "csa_extra" if lt == CSA else "hca_extra"
        t += [
            _t("attn.compressor.wkv.weight", "compressor", part, (coff * HD, D), "q8", q),
            _t("attn.compressor.wgate.weight", "compressor", part, (coff * HD, D), "q8", q),
            _t("attn.compressor.ape", "compressor", part, (ratio, coff * HD), "fp32", q),
            _t("attn.compressor.norm.weight", "compressor", part, (HD,), "bf16", q),
        ]
    if lt == CSA:
        ratio = dict(cfg.compress_rates)[CSA]
        x = "attn.indexer."
        t += [
            _t(x + "wq_b.weight", "indexer", "csa_extra", (IH * IHD, QL), "q", q),
            _t(x + "weights_proj.weight", "indexer", "csa_extra", (IH, D), "q8", q),
        ]
        if quant != "bf16":  # the INT8 indexer rotates q and keys by a Hadamard matrix
            t.append(_t(x + "hadamard", "indexer", "csa_extra", (IHD, IHD), "bf16", q))
        t += [
            _t(x + "compressor.wkv.weight", "indexer", "csa_extra", (2 * IHD, D), "q8", q),
            _t(x + "compressor.wgate.weight", "indexer", "csa_extra", (2 * IHD, D), "q8", q),
            _t(x + "compressor.ape", "indexer", "csa_extra", (ratio, 2 * IHD), "fp32", q),
            _t(x + "compressor.norm.weight", "indexer", "csa_extra", (IHD,), "bf16", q),
        ]
    t += [  # the attention's hc_post call runs the FFN's hc_pre + ffn_norm (the engine's hc_post_pre_norm)
        _t("hc_ffn_fn", "hc_post", me, (MIX, HC * D), "fp32", q),
        _t("hc_ffn_scale", "hc_post", me, (3,), "fp32", q),
        _t("hc_ffn_base", "hc_post", me, (MIX,), "fp32", q),
        _t("ffn_norm.weight", "hc_post", me, (D,), "bf16", q),
        _t("ffn.gate.weight", "gate", me, (E, D), "fp32", q),
    ]
    if not hash_layer:
        t.append(_t("ffn.gate.bias", "gate", me, (E,), "fp32", q))
    t += [
        _t("ffn.shared_experts.w1.weight", "moe", me, (I, D), "q", q),
        _t("ffn.shared_experts.w3.weight", "moe", me, (I, D), "q", q),
        _t("ffn.shared_experts.w2.weight", "moe", me, (D, I), "q", q),
        _t("ffn.experts.{e}.w1.weight", "moe", "routed_expert", (I, D), "qx", q),
        _t("ffn.experts.{e}.w3.weight", "moe", "routed_expert", (I, D), "qx", q),
        _t("ffn.experts.{e}.w2.weight", "moe", "routed_expert", (D, I), "qx", q),
    ]
    return t


def weight_parts(cfg: DeepSeekV4Config, layer_type: str, quant: str = "w8a8") -> dict[str, int]:
    """Weight bytes of one layer grouped as in spec §14.1: ``attention_common``, the type's
    ``csa_extra``/``hca_extra``, ``moe_dense``, ``routed_expert`` (ONE expert) and
    ``dense_total`` (everything but routed experts)."""
    parts: dict[str, int] = {}
    for tb in weight_table(cfg, layer_type, quant):
        parts[tb.part] = parts.get(tb.part, 0) + tb.nbytes
    parts["dense_total"] = sum(v for k, v in parts.items() if k != "routed_expert")
    return parts


def experts_active_default(cfg: DeepSeekV4Config, T: int) -> int:
    """``min(E, T·K)``: distinct routed experts assumed read by a step of T rows (upper bound)."""
    return min(cfg.n_routed_experts, T * cfg.num_experts_per_tok)


def _rows(T: int, rows_per_seq: int) -> tuple[int, int]:
    if T <= 0 or rows_per_seq <= 0 or T % rows_per_seq:
        raise ValueError(f"T ({T}) must be a positive multiple of rows_per_seq ({rows_per_seq})")
    return T // rows_per_seq, rows_per_seq


def stage_breakdown(cfg: DeepSeekV4Config, stage: str, layer_type: str, T: int, L: int,
                    quant: str = "w8a8", *, rows_per_seq: int = 1, experts_active: int | None = None,
                    hash_layer: bool = False) -> StageBytes:
    """Bytes of ``stage`` for one decode step of ``T`` rows at context ``L`` (see the module
    docstring for the model). ``hc_pre``/``hc_post`` cover both sublayers (attention and
    MoE), as the runtime's stage timer does; ``lm_head`` is the once-per-step tail
    (hc_head + final norm + head), independent of ``layer_type``."""
    _check_quant(quant)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if L < 0:
        raise ValueError(f"context length L must be >= 0, got {L}")
    lt = layer_type_name(layer_type)
    B, S = _rows(T, rows_per_seq)
    D, H, HD, QL, HC = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank, cfg.hc_mult
    K, IHD, V = cfg.num_experts_per_tok, cfg.index_head_dim, cfg.vocab_size
    W = cfg.sliding_window
    row = HD * BF16                                    # one raw / compressed KV row
    x_hc = T * HC * D * FP32                           # HC residual stream (FP32, spec §13)
    x_bf = T * D * BF16

    if stage == "lm_head":
        head = _t("head.weight", "lm_head", "head", (cfg.vocab_size, D), "q8", quant).nbytes
        w = head + HC * HC * D * FP32 + HC * FP32 + FP32 + D * BF16
        return StageBytes(w, 0, x_hc + T * V * FP32)

    weights = sum(tb.nbytes for tb in weight_table(cfg, lt, quant, hash_layer=hash_layer)
                  if tb.stage == stage and tb.part != "routed_expert")
    cache = act = 0
    if stage == "hc_pre":                              # x_hc in, x_mixed/post/comb out; x2 sublayers
        act = 2 * (x_hc + x_bf + T * (HC + HC * HC) * FP32)
    elif stage == "hc_post":                           # sublayer out + residual in, x_hc out; x2
        act = 2 * (x_bf + 2 * x_hc + T * (HC + HC * HC) * FP32)
    elif stage == "qkv_proj_rope":
        act = x_bf + T * (H * HD + HD + QL) * BF16
        cache = B * S * row                            # new window rows written
    elif stage == "compressor":
        if lt != SLIDING:
            ratio = dict(cfg.compress_rates)[lt]
            coff = 2 if lt == CSA else 1
            state_row = 2 * coff * HD * FP32           # kv ‖ score
            rows_read = (2 if lt == CSA else 1) * ratio
            per_token = state_row + (rows_read * state_row + row) / ratio
            cache = round(B * S * per_token)
            act = x_bf
    elif stage == "indexer":
        if lt == CSA:
            ratio = dict(cfg.compress_rates)[CSA]
            key = IHD + FP32 if quant != "bf16" else IHD * BF16
            state_row = 2 * 2 * IHD * FP32
            per_token = state_row + (2 * ratio * state_row + key) / ratio
            cache = B * ((L + S) // ratio) * key + round(B * S * per_token)
            act = T * (QL + D) * BF16
    elif stage == "sparse_attn":
        rows = min(L, W - 1) + S
        if lt == HCA:
            rows += (L + S) // dict(cfg.compress_rates)[HCA]
        elif lt == CSA:
            rows += min(S * cfg.index_topk, (L + S) // dict(cfg.compress_rates)[CSA])
        cache = B * rows * row
        act = T * H * HD * BF16 + x_bf
    elif stage == "gate":
        act = 2 * x_bf + T * K * (FP32 + 4)
        if hash_layer:
            cache = T * K * 4                          # tid2eid rows gathered
    elif stage == "moe":
        e_act = experts_active_default(cfg, T) if experts_active is None else experts_active
        if not 0 <= e_act <= cfg.n_routed_experts:
            raise ValueError(f"experts_active must lie in [0, {cfg.n_routed_experts}], got {e_act}")
        expert = sum(tb.nbytes for tb in weight_table(cfg, lt, quant) if tb.part == "routed_expert")
        weights += e_act * expert
        act = x_bf * (1 + K) + x_bf                    # shared + routed row reads, output
    return StageBytes(weights, cache, act)


def stage_bytes(cfg: DeepSeekV4Config, stage: str, layer_type: str, T: int, L: int,
                quant: str = "w8a8", **kw) -> int:
    """Total bytes (weights + cache + activations) of ``stage``; see :func:`stage_breakdown`
    for the keyword options (``rows_per_seq``, ``experts_active``, ``hash_layer``)."""
    return stage_breakdown(cfg, stage, layer_type, T, L, quant, **kw).total


def layer_breakdown(cfg: DeepSeekV4Config, layer_type: str, T: int, L: int, quant: str = "w8a8",
                    **kw) -> dict[str, StageBytes]:
    """:class:`StageBytes` of every per-layer stage (:data:`LAYER_STAGES`) of one decoder
    layer; stages a layer type does not run (compressor on SWA, indexer off CSA) are 0."""
    return {s: stage_breakdown(cfg, s, layer_type, T, L, quant, **kw) for s in LAYER_STAGES}


def layer_bytes(cfg: DeepSeekV4Config, layer_type: str, T: int, L: int, quant: str = "w8a8", **kw) -> int:
    """Total bytes of one decoder layer's decode step (attention + MoE sublayers)."""
    return sum(b.total for b in layer_breakdown(cfg, layer_type, T, L, quant, **kw).values())


def lm_head_bytes(cfg: DeepSeekV4Config, T: int, quant: str = "w8a8") -> int:
    """Bytes of the once-per-step tail: hc_head, final norm, LM head (BF16; INT8 + scales in
    ``int8``), logits out."""
    return stage_bytes(cfg, "lm_head", SLIDING, T, 0, quant)


def model_dense_weight_bytes(cfg: DeepSeekV4Config, quant: str = "w8a8") -> int:
    """Σ over the config's layers of the dense (non-routed) weight bytes, counted as spec §14
    does (gate bias on every layer): 8,521,271,368 B for Flash w8a8."""
    cache: dict[str, int] = {}
    total = 0
    for lt in cfg.layer_types:
        if lt not in cache:
            cache[lt] = weight_parts(cfg, lt, quant)["dense_total"]
        total += cache[lt]
    return total


def trace_stage_bytes(cfg, stage: str, layer_type: str | None, T: int, L: int, quant: str,
                      **kw) -> int | None:
    """Bytes one traced stage slice reads (roofline byte model), None for a stage the model
    does not count (embed, kv_cache, ...)."""
    if stage not in STAGES:
        return None
    try:
        return stage_bytes(cfg, stage, layer_type or SLIDING, T, L, quant, **kw)
    except ValueError:
        return None
