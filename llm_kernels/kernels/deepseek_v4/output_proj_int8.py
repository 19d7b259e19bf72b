"""The decode path of the INT8 grouped output projection (``int8`` scheme: per-row INT8
``wo_a`` as :class:`~llm_kernels.kernels.common.prepared.PackedRowGroups`, W8A8 ``wo_b`` as
:class:`~llm_kernels.kernels.common.prepared.PackedColumnGroups`), each as ONE parallel
region over all groups (:mod:`..common.gemm_multi`) instead of one GEMM call per group.

``o`` [T, G, K] -> per (token, group) INT8 rows -> ``wo_a`` group g -> ``r`` [G, T, OL]
rounded to the dtype -> per (token, group) INT8 rows -> ``wo_b`` (groups summed in order)
-> [T, D]. Bitwise equal to the per-group path of :mod:`.output_proj` (and so to the
reference's per-group ``rnd(w8a8_linear(o_g, wo_a_g))`` and W8A8 ``wo_b``): the same exact
INT32 sums, quantisation recipe and fp32 epilogue order.

:func:`fused_wo_b` is the ``wo_b`` half alone (the ``w8a8`` scheme keeps ``wo_a`` float).

Used when both weights are prepared with their stacks (tiled INT8 layouts, set up by
:func:`.output_proj.prepare_wo_a` / :func:`.output_proj.prepare_wo_b`) and ``T <= 16``
(one register tile per chunk); otherwise :mod:`.output_proj` runs its per-group calls.
"""

from __future__ import annotations

import numpy as np
import torch

from ..common.gemm import MAX_TILE_T, padded_tokens
from ..common.gemm_multi import cols_core, quant_pack_parts, rows_core
from ..common.jit import njit_kernel, sized

__all__ = ["fused_int8_output_proj", "fused_wo_b", "stacks_of"]


def stacks_of(wo_a, wo_b):
    """``(wo_a stack, wo_b stack)`` when both weights carry the stacks the fused path
    reads (prepared INT8 ``wo_a`` row groups and W8A8 ``wo_b`` column groups), else None."""
    sa = getattr(wo_a, "stack", None)
    sb = getattr(wo_b, "stack", None)
    if sa is None or sb is None:
        return None
    return sa, sb


def fused_int8_output_proj(x: np.ndarray, sa, sb, to_bf16: bool) -> torch.Tensor | None:
    """``x`` [T, G, K] float32 (dtype-rounded attention output per group) through the
    stacked ``wo_a`` (``sa``: G parts [OL, K]) and ``wo_b`` (``sb``: G parts [D, OL]) ->
    float32 [T, D] holding dtype values. Returns None when the shapes do not fit the fused
    path (``T > 16``, a group count or width that differs), so the caller falls back."""
    T, G, K = x.shape
    if not 0 < T <= MAX_TILE_T or sa.parts != G or sb.parts != G or sa.k != K or sb.k != sa.n:
        return None
    TP = padded_tokens(T)
    out = np.empty((T, sb.n), np.float32)
    program = sized(_output_proj_program, T * G * sa.n * (K + sb.n))  # wo_a and wo_b multiply-adds
    program(np.ascontiguousarray(x.transpose(1, 0, 2)), TP, sa.kp // 4, sa.data, sa.wsum128, sa.scale,
            sa.n, sb.kp // 4, sb.data, sb.wsum128, sb.scale[0], to_bf16, out)
    return torch.from_numpy(out)


@njit_kernel
def _output_proj_program(xa, TP, KG, wa, wsum_a, sw_a, OL, KGb, wb, wsum_b, sw_b, to_bf16, out):
    """:func:`fused_int8_output_proj`'s kernels in one dispatch: quantise + pack the G
    groups' rows, the ``wo_a`` multi-GEMM into ``r`` [G, T, OL] (dtype-rounded), then
    :func:`_wo_b_program`; the same kernels in the same order as separate calls."""
    G, T, _ = xa.shape
    nrows = np.full(G, T, np.int64)
    xp = np.empty((G, KG * 4 * TP), np.uint8)
    sx = np.empty((G, T), np.float32)
    quant_pack_parts(xa, nrows, xp, sx, TP, KG)
    r = np.empty((G, T, OL), np.float32)
    rows_core(xp, np.arange(G), nrows, TP, KG, wa, wsum_a, sw_a, OL, sx, to_bf16, r)
    _wo_b_program(r, TP, KGb, wb, wsum_b, sw_b, to_bf16, out)


@njit_kernel
def _wo_b_program(r, TP, KG, wb, wsum_b, sw_b, to_bf16, out):
    """``r`` [G, T, OL] -> per (group, token) INT8 rows -> the stacked ``wo_b`` column
    groups (summed in group order) -> ``out`` [T, D]."""
    G, T, _ = r.shape
    nrows = np.full(G, T, np.int64)
    xq = np.empty((G, KG * 4 * TP), np.uint8)
    sr = np.empty((G, T), np.float32)
    quant_pack_parts(r, nrows, xq, sr, TP, KG)
    cols_core(xq, T, TP, KG, wb, wsum_b, np.ascontiguousarray(sr.T), sw_b, out.shape[1], to_bf16, out)


def fused_wo_b(r: np.ndarray, sb, to_bf16: bool) -> torch.Tensor | None:
    """W8A8 ``wo_b`` alone (the ``w8a8`` scheme keeps ``wo_a`` float): ``r`` [T, G·OL]
    float32 (dtype-rounded) through the stacked column groups ``sb`` -> [T, D]; None when
    ``T > 16`` or the widths differ (the caller runs its per-group calls)."""
    T = r.shape[0]
    G = sb.parts
    if not 0 < T <= MAX_TILE_T or r.shape[1] != G * sb.k:
        return None
    return _wo_b(np.ascontiguousarray(r.reshape(T, G, sb.k).transpose(1, 0, 2)), sb, to_bf16)


def _wo_b(r: np.ndarray, sb, to_bf16: bool) -> torch.Tensor:
    """``r`` [G, T, OL] -> per (group, token) INT8 rows -> ``wo_b`` -> [T, D]."""
    T = r.shape[1]
    out = np.empty((T, sb.n), np.float32)
    sized(_wo_b_program, r.size * sb.n)(r, padded_tokens(T), sb.kp // 4, sb.data, sb.wsum128, sb.scale[0], to_bf16, out)
    return torch.from_numpy(out)
