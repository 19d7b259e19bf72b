"""A model's two stage tables in one object: the reference ops namespace and the fused
one (the reference with the kernel stages swapped in), with the lookups the model spec
serves (``stages(backend)``, ``backend_stages(backend)``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

__all__ = ["StageTable", "BACKENDS"]

BACKENDS = ("reference", "fused")


class StageTable:
    """Reference and fused stage implementations of one model.

    Args:
        reference: stage name -> torch reference function (every stage the engine calls).
        fused: stage name -> kernel function, for the stages that have one.

    Raises ValueError when a fused stage has no reference (a misspelt name would otherwise
    never be called)."""

    def __init__(self, reference: dict[str, Callable[..., Any]], fused: dict[str, Callable[..., Any]]):
        unknown = sorted(set(fused) - set(reference))
        if unknown:
            raise ValueError(f"fused stages {unknown} have no reference stage of the same name")
        self.reference = SimpleNamespace(**reference)
        self.fused = SimpleNamespace(**{**reference, **fused})
        self.fused_stages = tuple(fused)

    def stages(self, backend: str) -> SimpleNamespace:
        """The ops namespace of ``backend`` ("reference" or "fused"); ValueError otherwise."""
        if backend == "reference":
            return self.reference
        if backend == "fused":
            return self.fused
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def backend_stages(self, backend: str) -> dict[str, str]:
        """{stage: "fused" | "reference"}: which implementation each stage of ``backend`` uses."""
        self.stages(backend)
        fused = backend == "fused"
        return {k: "fused" if fused and k in self.fused_stages else "reference" for k in vars(self.reference)}
