"""Expected shape and kind of one checkpoint tensor (what a model's weight table lists)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TensorInfo"]


@dataclass(frozen=True)
class TensorInfo:
    """Expected shape and kind of one checkpoint tensor: ``"float"`` (any float dtype,
    converted to the compute dtype at load), ``"int"`` (an index table such as ``tid2eid``)
    or ``"int8"`` (a W8A8 weight)."""

    shape: tuple[int, ...]
    kind: str = "float"
