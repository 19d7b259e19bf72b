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

from ...numerics.group_quant import GroupQuantWeight
from ..common.gemm_group import group_gemm_linear, pack_group_w8, unpack_group_w8
from ..common.linear import linear as common_linear
from ..common.prepared import PackedGroupLinear, PreparedGroupWeight

__all__ = ["GroupStage", "GroupStageWeight", "group_linears", "prepare_group_stage"]


class GroupStage:
    """A stage's group-scaled weights concatenated by rows as ONE packed GEMM weight
    (``packed``: :class:`~..common.gemm_group.PackedGroupW8`; member i is rows
    ``starts[i] : starts[i] + rows[i]``): q|k|v or gate|up run as one GEMM, not one per weight."""

    __slots__ = ("packed", "rows", "starts")

    def __init__(self, packed, rows: list[int]):
        self.packed, self.rows = packed, list(rows)
        self.starts = [sum(self.rows[:i]) for i in range(len(self.rows))]


class GroupStageWeight(PreparedGroupWeight):
    """Member ``member`` of a prepared :class:`GroupStage` ``group``."""

    def __init__(self, group: GroupStage, member: int, scale: torch.Tensor) -> None:  # noqa: D107
        super().__init__(scale, group.rows[member], group.packed.k, group.packed.group)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "member", int(member))

    def unpack(self) -> torch.Tensor:
        s = self.group.starts[self.member]
        return unpack_group_w8(self.group.packed).qweight[s:s + self.n].clone()

    def packed_parts(self) -> list:
        return [self.group.packed]


def prepare_group_stage(ws: tuple) -> tuple:
    """Load-time form of a stage's group-scaled weights: one :class:`GroupStageWeight` per
    weight, sharing one concatenated packed GEMM weight (a single weight: a
    ``PackedGroupLinear``)."""
    if len(ws) == 1:
        return (PackedGroupLinear.of(ws[0]),)
    if _group_stage(ws) is not None:
        return tuple(ws)
    cat = GroupQuantWeight(torch.cat([w.qweight for w in ws], 0), torch.cat([w.scale for w in ws], 0),
                           ws[0].group_size)
    g = GroupStage(pack_group_w8(cat), [w.shape[0] for w in ws])
    return tuple(GroupStageWeight(g, i, w.scale) for i, w in enumerate(ws))


def _group_stage(ws: tuple) -> GroupStage | None:
    g = getattr(ws[0], "group", None)
    if not isinstance(g, GroupStage) or len(g.rows) != len(ws):
        return None
    if all(isinstance(w, GroupStageWeight) and w.group is g and w.member == i for i, w in enumerate(ws)):
        return g
    return None


def group_linears(x: np.ndarray, ws: tuple, dtype: torch.dtype) -> list[np.ndarray]:
    """The stage's group-scaled projections of ``x`` ``[T, K]``, each rounded to ``dtype``:
    one GEMM over the prepared concatenation (bitwise the per-weight GEMMs: every output
    column is its own block-ordered fold), else one GEMM per weight."""
    g = _group_stage(ws)
    if g is None:
        return [common_linear(torch.from_numpy(x), w, dtype).contiguous().numpy() for w in ws]
    y = group_gemm_linear(x, g.packed)
    if dtype == torch.bfloat16:
        y = torch.from_numpy(y).to(torch.bfloat16).float().numpy()
    return [np.ascontiguousarray(y[:, s:s + n]) for s, n in zip(g.starts, g.rows)]
