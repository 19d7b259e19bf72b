"""Prepared weights: the form a fused kernel reads, built once when the engine is built.

The engines call their backend's ``prepare_weights(weights, cfg)``
(``kernels/deepseek_v4/prepare.py``, ``kernels/qwen3/prepare.py``; the reference backend's
is the identity) and keep only the returned dict: every W8A8 weight a fused kernel reads is
replaced by a :class:`PreparedQuantWeight` holding its packed INT8 layout
(:class:`~.gemm_pack.PackedW8A8`, possibly shared by the weights of one stage that run as
one GEMM), so the kernels do no per-call lookups and no packing (the ggml "repack at load"
pattern). Float weights are kept as they are: the kernels read zero-copy views of them.

A prepared weight **is a** :class:`~llm_kernels.numerics.quant.QuantWeight` (so
``isinstance`` dispatch in the engines, references and kernels is unchanged) with the same
``shape`` and ``scale``, but it does not hold the raw ``[N, K]`` int8 tensor when the kernel
layout is a copy of it (``"vnni"``, and every concatenated stage weight): ``qweight`` is
then rebuilt from the packed layout on each access (:func:`~.gemm_pack.unpack_w8a8`,
bitwise the original) — fine for a reference or fallback path, slow for a hot loop. With
the plain ``"nk"`` layout of a single weight the packed data *is* the raw tensor (a view),
so nothing is duplicated either way.

Kernels still accept unprepared weights (tests call them with plain ``QuantWeight``): they
then pack on the fly for that call (no cache).

Group-scaled INT8 weights are prepared the same way as :class:`PreparedGroupWeight` s, and
MXFP4 weights (routed experts kept 4-bit) as :class:`PreparedMXFP4Weight` s: still an
``MXFP4Weight`` (same ``shape``/``scale``), the codes living only in the W4A8 layout of
:mod:`.gemm_mxfp4` (an expert's w1|w3 as one :class:`MXFP4RowsPack`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.mxfp4 import MXFP4Weight
from ...numerics.quant import QuantWeight
from .gemm_group import PackedGroupW8, pack_group_w8, unpack_group_w8
from .gemm_mxfp4 import PackedMXFP4, pack_mxfp4, unpack_mxfp4
from .gemm_pack import CHUNK_N, PackedW8A8, unpack_w8a8

__all__ = ["MXFP4RowsPack", "PackedMXFP4Linear", "PackedMXFP4Rows", "PreparedMXFP4Weight", "mxfp4_rows_pack",
           "pack_mxfp4_rows",
           "GroupRowsPack", "PackedColumnGroups", "PackedGroupLinear", "PackedGroupRowGroups", "PackedGroupRows",
           "PackedLinear", "PackedRowGroups", "PackedRows", "PreparedGroupWeight", "PreparedQuantWeight",
           "group_rows_pack", "is_int8_weight", "pack_group_rows", "stage_group"]


def is_int8_weight(w: Any) -> bool:
    """True for an INT8 weight of either scale granularity (:class:`QuantWeight`, per
    row; :class:`GroupQuantWeight`, per block of inputs), prepared or not."""
    return isinstance(w, (QuantWeight, GroupQuantWeight))


class PreparedQuantWeight(QuantWeight):
    """Base of the prepared W8A8 weights: a :class:`QuantWeight` of logical shape
    ``[n, k]`` and per-channel ``scale`` whose INT8 payload lives in a packed layout.
    ``qweight`` is rebuilt on access (see the module docstring); ``nbytes`` counts the
    packed payload this object references. Compared and hashed by identity."""

    def __init__(self, scale: torch.Tensor, n: int, k: int) -> None:  # noqa: D107
        object.__setattr__(self, "scale", scale.detach().float().contiguous())
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "k", int(k))
        object.__setattr__(self, "_shape", torch.Size((int(n), int(k))))

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def qweight(self) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(self.unpack())

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def unpack(self) -> np.ndarray:
        """The int8 ``[n, k]`` weight (a new array unless the layout is the raw one)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k})"


class PackedLinear(PreparedQuantWeight):
    """A weight run as one GEMM of its own: ``packed`` is its :class:`PackedW8A8`."""

    def __init__(self, packed: PackedW8A8, scale: torch.Tensor) -> None:
        super().__init__(scale, packed.n, packed.k)
        object.__setattr__(self, "packed", packed)

    def unpack(self) -> np.ndarray:
        return unpack_w8a8(self.packed)

    def __repr__(self) -> str:
        return f"PackedLinear(n={self.n}, k={self.k}, layout={self.packed.layout!r})"


class PackedRows(PreparedQuantWeight):
    """One weight of a stage whose weights are packed together as one GEMM.

    ``group``: the stage's prepared object (kernel-specific; it holds the packed weight);
    ``member``: this weight's position among the stage's weights; ``packed``: the
    :class:`PackedW8A8` holding its rows. Rows ``start .. start + n`` of ``packed``, or
    with ``interleave`` = j >= 0 the rows interleaved per :data:`CHUNK_N`-row chunk (chunk
    c holds ``CHUNK_N/2`` rows of member 0, then the same rows of member 1)."""

    def __init__(self, group: Any, member: int, packed: PackedW8A8, scale: torch.Tensor, n: int,
                 start: int = 0, interleave: int = -1) -> None:
        super().__init__(scale, n, packed.k)
        for name, v in (("group", group), ("member", int(member)), ("packed", packed),
                        ("start", int(start)), ("interleave", int(interleave))):
            object.__setattr__(self, name, v)

    def rows(self) -> np.ndarray:
        """Row indices of this weight in ``packed``."""
        r = np.arange(self.n)
        if self.interleave < 0:
            return self.start + r
        half = CHUNK_N // 2
        return (r // half) * CHUNK_N + self.interleave * half + r % half

    def unpack(self) -> np.ndarray:
        return np.ascontiguousarray(unpack_w8a8(self.packed)[self.rows()])


class PackedColumnGroups(PreparedQuantWeight):
    """A weight whose input columns are split into ``len(packs)`` equal groups, one packed
    GEMM weight per group (DeepSeek's grouped ``wo_b``)."""

    def __init__(self, packs: list[PackedW8A8], scale: torch.Tensor) -> None:
        super().__init__(scale, packs[0].n, sum(p.k for p in packs))
        object.__setattr__(self, "packs", list(packs))

    def unpack(self) -> np.ndarray:
        return np.concatenate([unpack_w8a8(p) for p in self.packs], axis=1)


class PackedRowGroups(PreparedQuantWeight):
    """A weight whose output rows are split into ``len(packs)`` equal groups, each one
    packed GEMM weight with its rows' scales (DeepSeek's grouped ``wo_a`` in the ``int8``
    scheme: group g projects its own input slice)."""

    def __init__(self, packs: list[PackedW8A8], scale: torch.Tensor) -> None:
        super().__init__(scale, sum(p.n for p in packs), packs[0].k)
        object.__setattr__(self, "packs", list(packs))

    def unpack(self) -> np.ndarray:
        return np.concatenate([unpack_w8a8(p) for p in self.packs], axis=0)


class PreparedGroupWeight(GroupQuantWeight):
    """Base of the prepared group-scaled INT8 weights: a :class:`GroupQuantWeight` of
    logical shape ``[n, k]`` (same ``scale`` and ``group_size``) whose int8 payload lives
    in packed layouts; ``qweight`` is rebuilt on access (reference / fallback use only).
    Compared and hashed by identity."""

    def __init__(self, scale: torch.Tensor, n: int, k: int, group_size: int) -> None:  # noqa: D107
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "group_size", int(group_size))
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "k", int(k))

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def qweight(self) -> torch.Tensor:  # type: ignore[override]
        return self.unpack()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.k))

    def unpack(self) -> torch.Tensor:
        """The int8 ``[n, k]`` weight (a new tensor)."""
        raise NotImplementedError

    def packed_parts(self) -> list[PackedGroupW8]:
        """The packed weights a GEMM over this weight reads (possibly shared with other
        weights of one stage: count them once by identity)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k}, G={self.group_size})"


class PackedGroupLinear(PreparedGroupWeight):
    """A group-scaled weight run as one GEMM of its own: ``packed`` is its
    :class:`~.gemm_group.PackedGroupW8`."""

    def __init__(self, packed: PackedGroupW8) -> None:  # noqa: D107
        super().__init__(packed.scale, packed.n, packed.k, packed.group)
        object.__setattr__(self, "packed", packed)

    @classmethod
    def of(cls, w: GroupQuantWeight) -> "PackedGroupLinear":
        """``w`` packed for this process's kernel (``w`` itself when already prepared)."""
        return w if isinstance(w, PackedGroupLinear) else cls(pack_group_w8(w))

    def unpack(self) -> torch.Tensor:
        return unpack_group_w8(self.packed).qweight

    def packed_parts(self) -> list[PackedGroupW8]:
        return [self.packed]


class PackedGroupRowGroups(PreparedGroupWeight):
    """A group-scaled weight whose output rows are split into ``len(packs)`` equal groups,
    each its own packed GEMM weight (DeepSeek's grouped ``wo_a``)."""

    def __init__(self, packs: list[PackedGroupW8], scale: torch.Tensor) -> None:  # noqa: D107
        super().__init__(scale, sum(p.n for p in packs), packs[0].k, packs[0].group)
        object.__setattr__(self, "packs", list(packs))

    def unpack(self) -> torch.Tensor:
        return torch.cat([unpack_group_w8(p).qweight for p in self.packs], 0)

    def packed_parts(self) -> list[PackedGroupW8]:
        return list(self.packs)


class GroupRowsPack:
    """Group-scaled weights of one stage concatenated by rows as ONE packed GEMM weight
    (``packed``: :class:`~.gemm_group.PackedGroupW8`; member i is rows ``starts[i] :
    starts[i] + rows[i]``): Qwen3's q|k|v or gate|up, an expert's w1|w3 run as one GEMM."""

    __slots__ = ("packed", "rows", "starts")

    def __init__(self, packed: PackedGroupW8, rows: list[int]):
        self.packed, self.rows = packed, list(rows)
        self.starts = [sum(self.rows[:i]) for i in range(len(self.rows))]


class PackedGroupRows(PreparedGroupWeight):
    """Member ``member`` of a prepared :class:`GroupRowsPack` ``group``."""

    def __init__(self, group: GroupRowsPack, member: int, scale: torch.Tensor) -> None:  # noqa: D107
        super().__init__(scale, group.rows[member], group.packed.k, group.packed.group)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "member", int(member))

    def unpack(self) -> torch.Tensor:
        s = self.group.starts[self.member]
        return unpack_group_w8(self.group.packed).qweight[s:s + self.n].clone()

    def packed_parts(self) -> list[PackedGroupW8]:
        return [self.group.packed]


def group_rows_pack(ws: tuple) -> GroupRowsPack | None:
    """The shared :class:`GroupRowsPack` when ``ws`` are exactly its members 0, 1, ... in
    order (made by :func:`pack_group_rows`), else None."""
    g = getattr(ws[0], "group", None)
    if not isinstance(g, GroupRowsPack) or len(g.rows) != len(ws):
        return None
    if all(isinstance(w, PackedGroupRows) and w.group is g and w.member == i for i, w in enumerate(ws)):
        return g
    return None


def pack_group_rows(ws: tuple) -> tuple:
    """Load-time form of group-scaled weights with the same K run as one GEMM: one
    :class:`PackedGroupRows` per weight sharing one concatenated pack (``ws`` itself when
    already so prepared)."""
    if group_rows_pack(ws) is not None:
        return tuple(ws)
    cat = GroupQuantWeight(torch.cat([w.qweight for w in ws], 0), torch.cat([w.scale for w in ws], 0),
                           ws[0].group_size)
    g = GroupRowsPack(pack_group_w8(cat), [w.shape[0] for w in ws])
    return tuple(PackedGroupRows(g, i, w.scale) for i, w in enumerate(ws))


def stage_group(ws: tuple, group_type: type) -> Any:
    """The shared group object when ``ws`` are exactly the members 0, 1, … of one prepared
    group of ``group_type`` (:class:`PackedRows` made by a ``prepare_weights``; the group
    has ``n_members`` of them), else None (then the kernel packs the weights itself)."""
    g = getattr(ws[0], "group", None)
    if not isinstance(g, group_type) or g.n_members != len(ws):
        return None
    for i, w in enumerate(ws):
        if not isinstance(w, PackedRows) or w.group is not g or w.member != i:
            return None
    return g


# --------------------------------------------------------------------------- MXFP4 (W4A8)
class PreparedMXFP4Weight(MXFP4Weight):
    """Base of the prepared MXFP4 weights: an :class:`~llm_kernels.numerics.mxfp4.MXFP4Weight`
    of logical shape ``[n, k]`` (same UE8M0 ``scale``) whose 4-bit codes live in a packed
    W4A8 layout (:class:`~.gemm_mxfp4.PackedMXFP4`); ``packed`` (the ``[n, k/2]`` codes) is
    rebuilt on access (reference / fallback use only). Compared and hashed by identity."""

    def __init__(self, scale: torch.Tensor, n: int, k: int) -> None:  # noqa: D107
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "k", int(k))

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def packed(self) -> torch.Tensor:  # type: ignore[override]
        return self.unpack()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.k))

    @property
    def nbytes(self) -> int:
        return self.n * self.k // 2 + self.scale.numel()

    def unpack(self) -> torch.Tensor:
        """The uint8 ``[n, k/2]`` codes (a new tensor)."""
        raise NotImplementedError

    def packed_parts(self) -> list[PackedMXFP4]:
        """The packed weights a GEMM over this weight reads (possibly shared)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k})"


class PackedMXFP4Linear(PreparedMXFP4Weight):
    """An MXFP4 weight run as one W4A8 GEMM of its own: ``pack`` is its :class:`PackedMXFP4`."""

    def __init__(self, pack: PackedMXFP4, scale: torch.Tensor) -> None:  # noqa: D107
        super().__init__(scale, pack.n, pack.k)
        object.__setattr__(self, "pack", pack)

    @classmethod
    def of(cls, w: MXFP4Weight) -> "PackedMXFP4Linear":
        """``w`` packed for this process's kernel (``w`` itself when already prepared)."""
        return w if isinstance(w, PackedMXFP4Linear) else cls(pack_mxfp4(w), w.scale)

    def unpack(self) -> torch.Tensor:
        return unpack_mxfp4(self.pack).packed

    def packed_parts(self) -> list[PackedMXFP4]:
        return [self.pack]


class MXFP4RowsPack:
    """MXFP4 weights with the same K concatenated by rows as ONE packed W4A8 weight
    (``pack``; member i is rows ``starts[i] : starts[i] + rows[i]``): an expert's w1|w3."""

    __slots__ = ("pack", "rows", "slot", "stack", "starts")

    def __init__(self, pack: PackedMXFP4, rows: list[int]):
        self.pack, self.rows = pack, list(rows)
        self.starts = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.stack, self.slot = None, -1  # an expert's w1|w3: set by moe_multi.stack_mxfp4_experts


class PackedMXFP4Rows(PreparedMXFP4Weight):
    """Member ``member`` of a prepared :class:`MXFP4RowsPack` ``group``."""

    def __init__(self, group: MXFP4RowsPack, member: int, scale: torch.Tensor) -> None:  # noqa: D107
        super().__init__(scale, group.rows[member], group.pack.k)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "member", int(member))

    def unpack(self) -> torch.Tensor:
        s = self.group.starts[self.member]
        return unpack_mxfp4(self.group.pack).packed[s:s + self.n].clone()

    def packed_parts(self) -> list[PackedMXFP4]:
        return [self.group.pack]


def mxfp4_rows_pack(ws: tuple) -> MXFP4RowsPack | None:
    """The shared :class:`MXFP4RowsPack` when ``ws`` are exactly its members 0, 1, ... in
    order (made by :func:`pack_mxfp4_rows`), else None."""
    g = getattr(ws[0], "group", None)
    if not isinstance(g, MXFP4RowsPack) or len(g.rows) != len(ws):
        return None
    if all(isinstance(w, PackedMXFP4Rows) and w.group is g and w.member == i for i, w in enumerate(ws)):
        return g
    return None


def pack_mxfp4_rows(ws: tuple) -> tuple:
    """Load-time form of MXFP4 weights with the same K run as one W4A8 GEMM: one
    :class:`PackedMXFP4Rows` per weight sharing one concatenated pack (``ws`` itself when
    already so prepared). Raises ValueError when the K differ."""
    if mxfp4_rows_pack(ws) is not None:
        return tuple(ws)
    if len({int(w.shape[1]) for w in ws}) != 1:
        raise ValueError(f"MXFP4 weights run as one GEMM need one K, got shapes {[tuple(w.shape) for w in ws]}")
    cat = MXFP4Weight(torch.cat([w.packed for w in ws], 0), torch.cat([w.scale for w in ws], 0))
    g = MXFP4RowsPack(pack_mxfp4(cat), [int(w.shape[0]) for w in ws])
    return tuple(PackedMXFP4Rows(g, i, w.scale) for i, w in enumerate(ws))
