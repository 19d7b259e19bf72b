"""Sparse attention over a gathered KV set, with attention sinks, inverse RoPE on the
output and the grouped low-rank output projection (``sparse_attn``).

One shared 512-d KV row per attended entry serves as key and value (MQA, K = V). Each
query token attends to its own list of rows of a KV pool (sliding-window rows plus
compressed entries), so SWA, CSA and HCA layers differ only in the lists they pass.

Spec: ``shared/design/deepseek_v4_architecture.md`` §9.1-§9.3 (paper §2.3).
"""

from __future__ import annotations

import torch

from ...numerics.linear import matmul
from ...numerics.group_quant import GroupQuantWeight, group_linear
from ...numerics.quant import QuantWeight, int8_matmul, quant_per_row, w8a8_linear
from ...numerics.rounding import rnd
from .common import apply_rope

__all__ = ["sparse_attn", "sparse_attn_core", "sparse_attn_core_ragged", "grouped_output_proj"]


def grouped_output_proj(o: torch.Tensor, wo_a: torch.Tensor, wo_b, *, o_groups: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Grouped low-rank output projection (spec §9.3).

    o [T, H, HD] -> groups of H/G consecutive heads [T, G, (H/G)·HD]; group g is projected
    by rows ``g·OL:(g+1)·OL`` of wo_a [G·OL, (H/G)·HD] to [T, G, OL]; the concatenation
    [T, G·OL] is projected by wo_b [D, G·OL] to [T, D]. Rounded to ``dtype`` after each
    projection. W8A8 (``wo_b`` a QuantWeight, spec §9.3): each (token, group) row of OL is
    quantised on its own, ``out = s_w ⊙ Σ_g s[t,g] · (r_i8[t,g] @ wo_b[:, g]ᵀ)``.
    INT8 ``wo_a`` (a QuantWeight, the ``int8`` scheme): each group is one W8A8 linear of
    its (token, group) rows with its OL weight rows and their per-row scales,
    ``r[:, g] = rnd(w8a8_linear(o_g, wo_a[g·OL:(g+1)·OL]))``. Group-scaled INT8 (a
    GroupQuantWeight, the ``int8_g32`` scheme): the same per-group split for ``wo_a`` with
    ``group_linear``; ``wo_b`` is one ``group_linear`` of ``[T, G·OL]`` (its blocks of 32
    inputs never straddle two groups)."""
    T = o.shape[0]
    og = o.float().reshape(T, o_groups, -1)
    if isinstance(wo_a, QuantWeight):
        ol = wo_a.shape[0] // o_groups
        r = torch.stack([rnd(w8a8_linear(og[:, g], QuantWeight(wo_a.qweight[g * ol:(g + 1) * ol],
                                                                  wo_a.scale[g * ol:(g + 1) * ol])), dtype)
                         for g in range(o_groups)], dim=1)                  # [T, G, OL]
    elif isinstance(wo_a, GroupQuantWeight):
        ol = wo_a.shape[0] // o_groups
        r = torch.stack([rnd(group_linear(og[:, g], GroupQuantWeight(wo_a.qweight[g * ol:(g + 1) * ol],
                                                                     wo_a.scale[g * ol:(g + 1) * ol],
                                                                     wo_a.group_size)), dtype)
                         for g in range(o_groups)], dim=1)                  # [T, G, OL]
    else:
        wa = wo_a.float().view(o_groups, -1, og.shape[-1])
        r = matmul(og.transpose(0, 1), wa.transpose(1, 2), dtype).transpose(0, 1)   # [T, G, OL]
    if isinstance(wo_b, QuantWeight):
        q, s = quant_per_row(r)                                               # [T, G, OL], [T, G, 1]
        ol = r.shape[-1]
        wq = wo_b.qweight.view(wo_b.shape[0], o_groups, ol)
        out = torch.zeros(T, wo_b.shape[0])
        for g in range(o_groups):
            out += int8_matmul(q[:, g], wq[:, g]).float() * s[:, g]
        return rnd(out * wo_b.scale.float(), dtype)
    if isinstance(wo_b, GroupQuantWeight):
        return rnd(group_linear(r.reshape(T, -1), wo_b), dtype)
    return matmul(r.reshape(T, -1), wo_b.float().T, dtype)


def sparse_attn(q: torch.Tensor, kv_pool: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, *,
                o_groups: int, softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Attention of each query over its own rows of a KV pool, then output projection.

    Args:
        q: [T, H, HD] roped queries.
        kv_pool: [N, HD] KV rows (raw window rows and compressed entries).
        indices: [T, W] int rows of ``kv_pool`` each query attends, -1 = padding.
        attn_sink: [H] float32 per-head sink logit (joins the softmax denominator, no value).
        cos, sin: [T, RD/2] at the query positions (layer profile), for the inverse RoPE.
        wo_a: [G·OL, (H/G)·HD]; wo_b: [D, G·OL].
    Returns:
        [T, D] attention output, float32 holding ``dtype``-rounded values.
    Math: ``s_j = q·kv_j · scale``; ``o = Σ_j softmax([s, sink])_j · kv_j``; the output's
    rope lanes are rotated by -pos; a query with no valid row outputs 0.
    """
    o = sparse_attn_core(q, kv_pool, indices, attn_sink, cos, sin, softmax_scale=softmax_scale, dtype=dtype)
    return grouped_output_proj(o, wo_a, wo_b, o_groups=o_groups, dtype=dtype)


def sparse_attn_core(q: torch.Tensor, kv_pool: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, *, softmax_scale: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """The attention part of :func:`sparse_attn` (scores, softmax with sinks, PV, inverse RoPE
    on the rope lanes): returns o [T, H, HD] float32 holding ``dtype``-rounded values, the
    input of :func:`grouped_output_proj`. Arguments as in :func:`sparse_attn`."""
    T, H, _ = q.shape
    N = kv_pool.shape[0]
    if indices.numel() and int(indices.max()) >= N:
        raise IndexError(f"indices reference row {int(indices.max())} but kv_pool has {N} rows")
    # Dense-over-pool form: a [T, N] mask from the index lists, then [H, T, HD] @ [HD, N].
    # Same math as gathering the rows; this GEMM layout is the one bf16 inference
    # (transformers' eager attention) runs, which keeps the bf16 path bit-comparable.
    allowed = torch.zeros(T, N + 1, dtype=torch.bool)
    allowed.scatter_(1, torch.where(indices >= 0, indices, torch.full_like(indices, N)).long(), True)
    allowed = allowed[:, :N]
    pool = kv_pool.float()
    s = matmul(q.float().transpose(0, 1), pool.T, dtype)                   # [H, T, N]
    s = rnd(s * softmax_scale, dtype)
    s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    sink = attn_sink.float().view(H, 1, 1).expand(H, T, 1)
    logits = torch.cat([s, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    p = rnd(torch.softmax(logits, dim=-1)[..., :-1], dtype)
    o = matmul(p, pool, dtype).transpose(0, 1)                             # [T, H, HD]
    o = apply_rope(o, cos[:, None, :], sin[:, None, :], dtype, inverse=True)
    return o


def sparse_attn_core_ragged(q: torch.Tensor, pools: list[list[torch.Tensor]], indices: list[torch.Tensor],
                            attn_sink: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                            softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`sparse_attn_core` of a ragged batch: sequence ``b`` owns ``indices[b].shape[0]``
    consecutive rows of ``q`` (and of ``cos``/``sin``) and attends its own KV pool, the
    concatenation of the pieces ``pools[b]`` (e.g. window rows, the step's new rows,
    compressed entries), through ``indices[b]`` [T_b, W_b] (rows of that pool, -1 = padding;
    widths may differ between sequences). Returns o [ΣT_b, H, HD] in the order of ``q``.

    Here: one :func:`sparse_attn_core` call per sequence. Raises ValueError when the lists'
    lengths differ or ``ΣT_b != q.shape[0]``; IndexError as :func:`sparse_attn_core`."""
    offs = _ragged_offsets(q, pools, indices)
    outs = [sparse_attn_core(q[offs[b]:offs[b + 1]], torch.cat(list(pools[b]), dim=0), indices[b], attn_sink,
                             cos[offs[b]:offs[b + 1]], sin[offs[b]:offs[b + 1]], softmax_scale=softmax_scale,
                             dtype=dtype) for b in range(len(pools))]
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def _ragged_offsets(q: torch.Tensor, pools, indices) -> list[int]:
    """Row offsets of each sequence in ``q`` (len(pools) + 1); validates the ragged layout."""
    if len(pools) != len(indices):
        raise ValueError(f"pools and indices need one entry per sequence, got {len(pools)} and {len(indices)}")
    offs = [0]
    for ib in indices:
        if ib.dim() != 2:
            raise ValueError(f"indices must be [T_b, W_b] per sequence, got {tuple(ib.shape)}")
        offs.append(offs[-1] + int(ib.shape[0]))
    if offs[-1] != q.shape[0]:
        raise ValueError(f"the sequences' index rows sum to {offs[-1]} but q has {q.shape[0]} rows")
    return offs
