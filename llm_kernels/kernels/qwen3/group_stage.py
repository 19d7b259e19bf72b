"""Group-scaled INT8 (``int8_g32``) weights of the fused Qwen3 projection stages: the
stage's weights (q|k|v, gate|up) concatenated by rows into ONE packed group-scaled GEMM
weight at load (:func:`prepare_group_stage`), run as one GEMM whose output columns are
split per weight (:func:`group_linears`); the stage's float-path epilogue follows
(:mod:`.proj_common`). Bitwise equal to one GEMM per weight and to the reference: every
output column is its own exact, block-ordered fold
(:mod:`llm_kernels.numerics.group_quant`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..common.gemm_group import group_gemm_linear
from ..common.linear import linear as common_linear
from ..common.prepared import PackedGroupLinear, group_rows_pack, pack_group_rows

__all__ = ["group_linears", "prepare_group_stage"]


def prepare_group_stage(ws: tuple) -> tuple:
    """Load-time form of a stage's group-scaled weights: one
    :class:`~..common.prepared.PackedGroupRows` per weight sharing one concatenated packed
    GEMM weight (a single weight: a ``PackedGroupLinear``)."""
    if len(ws) == 1:
        return (PackedGroupLinear.of(ws[0]),)
    return pack_group_rows(ws)


def group_linears(x: np.ndarray, ws: tuple, dtype: torch.dtype) -> list[np.ndarray]:
    """The stage's group-scaled projections of ``x`` ``[T, K]``, each rounded to ``dtype``:
    one GEMM over the prepared concatenation (bitwise the per-weight GEMMs: every output
    column is its own block-ordered fold), else one GEMM per weight."""
    g = group_rows_pack(ws)
    if g is None:
        return [common_linear(torch.from_numpy(x), w, dtype).contiguous().numpy() for w in ws]
    y = group_gemm_linear(x, g.packed)
    if dtype == torch.bfloat16:
        y = torch.from_numpy(y).to(torch.bfloat16).float().numpy()
    return [np.ascontiguousarray(y[:, s:s + n]) for s, n in zip(g.starts, g.rows)]
