"""Bytes a decode step reads, counted from an engine's prepared weights themselves (not a
formula that can drift): every tensor at its storage size, packed W8A8 weights by their
packed storage (payload + per-channel scales + VNNI row sums), the embedding one row per
token, MoE: the shared experts plus ``num_experts_per_tok`` routed experts per layer (a
B-sequence step reads at most min(B·k, E) distinct routed experts). KV-cache and activation
reads are not counted. Used by the model-level benchmark (:mod:`.model`)."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

__all__ = ["weight_storage", "decode_read_bytes", "bytes_per_step"]


def _packed_bytes(pk: Any) -> int:
    """Storage a W8A8 GEMM reads of one :class:`~llm_kernels.kernels.common.gemm_pack.PackedW8A8`:
    the payload, the float32 scales and (packed layouts: ``"vnni"``/``"avx2"``, whose
    epilogues read them) the int32 zero-point row sums."""
    from ..kernels.common.gemm_pack import is_tiled

    n = int(pk.data.nbytes) + int(pk.scale.nbytes)
    if is_tiled(pk.layout):
        n += int(pk.wsum128.nbytes)
    return n


def weight_storage(w: Any, seen: set[int] | None = None) -> int:
    """Bytes of storage ``w`` holds: a tensor's ``numel·element_size``; a plain ``QuantWeight``
    its int8 ``qweight`` + ``scale``; a prepared (packed) weight its packed storage
    (:func:`_packed_bytes`), each ``PackedW8A8`` counted once per ``seen`` set (weights of one
    stage / expert share one pack). TypeError for anything else (so a new storage type cannot
    be silently miscounted)."""
    import torch

    from ..kernels.common.gemm_group import PackedGroupW8
    from ..kernels.common.prepared import (
        PackedColumnGroups,
        PackedLinear,
        PackedRowGroups,
        PackedRows,
        PreparedGroupWeight,
    )
    from ..numerics.group_quant import GroupQuantWeight
    from ..numerics.mxfp4 import MXFP4Weight
    from ..numerics.quant import QuantWeight

    seen = set() if seen is None else seen
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    packs = None
    if isinstance(w, (PackedLinear, PackedRows)):
        packs = [w.packed]
    elif isinstance(w, (PackedColumnGroups, PackedRowGroups)):
        packs = list(w.packs)
    elif isinstance(w, PreparedGroupWeight):
        packs = w.packed_parts()
    if packs is not None:
        total = 0
        for pk in packs:
            if id(pk) not in seen:
                seen.add(id(pk))
                total += pk.nbytes if isinstance(pk, PackedGroupW8) else _packed_bytes(pk)
        return total
    if isinstance(w, MXFP4Weight):  # packed E2M1 pairs + UE8M0 bytes
        return w.nbytes
    if type(w) in (QuantWeight, GroupQuantWeight):
        return w.qweight.numel() * w.qweight.element_size() + w.scale.numel() * w.scale.element_size()
    raise TypeError(f"cannot count the storage of a {type(w).__name__}")


def _params(w: Any) -> int:
    import torch

    if isinstance(w, torch.Tensor):
        return w.numel()
    return math.prod(w.shape)


_EMBED = re.compile(r"(^|\.)embed(_tokens)?\.weight$")
_ROW_PER_TOKEN = re.compile(r"(^|\.)tid2eid$")
ROUTED_EXPERT = re.compile(r"^(.*\.)experts\.(\d+)\.(.+)$")


def decode_read_bytes(weights: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Bytes of weights one decode token reads, counted from ``weights`` (the engine's prepared
    dict; see the module docstring for the rules). Returns a breakdown::

        per_token        the total for one token of one sequence
        dense            tensors read in full (norms, attention, shared experts, head, ...)
        vectors          the 1-D part of ``dense`` (norms, biases, ...)
        per_seq_rows     embedding row (+ the tid2eid hash-routing row) per token
        routed_per_token k routed experts per MoE layer (0 for a dense model)
        expert_bytes     {layer prefix: mean bytes of one routed expert}
        experts_per_tok, n_routed_experts   (MoE; None for a dense model)
        tied_head        the head is the embedding matrix (read in full in addition to its row)
        total_storage, params               every weight (all experts), for size / params
    """
    seen: set[int] = set()
    dense = vectors = rows = 0
    experts: dict[str, dict[int, int]] = {}
    total = params = 0
    embed_name = None
    for name, w in weights.items():
        params += _params(w)
        m = ROUTED_EXPERT.match(name)
        if m is not None:
            b = weight_storage(w, seen)
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), 0)
            experts[m.group(1)][int(m.group(2))] += b
            total += b
            continue
        b = weight_storage(w, seen)
        total += b
        shape = tuple(w.shape)
        if _EMBED.search(name) or _ROW_PER_TOKEN.search(name):
            rows += b // shape[0]
            if _EMBED.search(name):
                embed_name = name
            continue
        dense += b
        if len(shape) <= 1:
            vectors += b
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and embed_name is not None
    if tied:
        dense += weight_storage(weights[embed_name], set())
    k = getattr(cfg, "num_experts_per_tok", None) if experts else None
    n_exp = getattr(cfg, "n_routed_experts", None) if experts else None
    expert_bytes = {p: statistics.fmean(d.values()) for p, d in experts.items()}
    routed = sum(v * k for v in expert_bytes.values()) if experts else 0
    return {"per_token": int(round(dense + rows + routed)), "dense": dense, "vectors": vectors,
            "per_seq_rows": rows, "routed_per_token": int(round(routed)), "expert_bytes": expert_bytes,
            "experts_per_tok": k, "n_routed_experts": n_exp, "tied_head": tied, "total_storage": total,
            "params": params}


def bytes_per_step(rb: dict[str, Any], batch: int) -> int:
    """Weight bytes of one decode step of ``batch`` sequences (one token each): the dense part
    once, the per-token rows ``batch`` times, min(batch·k, E) routed experts per MoE layer (an
    upper bound on the distinct experts of the step)."""
    if batch == 1:
        return rb["per_token"]
    routed = 0.0
    if rb["expert_bytes"]:
        k, e = rb["experts_per_tok"], rb["n_routed_experts"]
        routed = sum(v * min(batch * k, e) for v in rb["expert_bytes"].values())
    return int(round(rb["dense"] + batch * rb["per_seq_rows"] + routed))
