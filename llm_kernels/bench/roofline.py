"""Model-neutral pieces of the memory-bandwidth roofline: the byte records a model's byte
model returns (:class:`TensorBytes`, :class:`StageBytes`) and the time / percentage
formulas. The per-model byte models are ``llm_kernels/models/<name>/roofline.py``
(used by the models' byte models, ``models/<name>/roofline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TensorBytes", "StageBytes", "roofline_seconds", "roofline_pct", "FP32", "BF16", "INT8"]

FP32, BF16, INT8 = 4, 2, 1


@dataclass(frozen=True)
class TensorBytes:
    """One weight tensor as the decode kernels read it."""

    name: str      # canonical checkpoint name without the ``layers.{i}.`` prefix
    stage: str     # stage that reads it
    part: str      # group of the model's byte table (e.g. spec §14: attention_common, moe_dense, ...)
    shape: tuple[int, ...]
    dtype: str     # "fp32", "bf16", "int8+fp32 scale"
    nbytes: int


@dataclass(frozen=True)
class StageBytes:
    """Bytes of one stage: weights, cache traffic (KV rows, indexer keys, compressor state)
    and activations."""

    weights: int
    cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations

    def __add__(self, other: "StageBytes") -> "StageBytes":
        return StageBytes(self.weights + other.weights, self.cache + other.cache,
                          self.activations + other.activations)


def roofline_seconds(nbytes: float, bandwidth_gbs: float) -> float:
    """Ideal time to move ``nbytes`` at ``bandwidth_gbs`` GB/s (10⁹ B/s)."""
    if bandwidth_gbs <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {bandwidth_gbs}")
    return nbytes / (bandwidth_gbs * 1e9)


def roofline_pct(nbytes: float, seconds: float, bandwidth_gbs: float) -> float | None:
    """% of the memory roofline: ``100 · (nbytes / (bandwidth_gbs·10⁹)) / seconds`` — 100 means
    the bytes moved at the measured DRAM bandwidth. None when ``seconds <= 0``. Raises
    ValueError for a bandwidth <= 0."""
    t = roofline_seconds(nbytes, bandwidth_gbs)
    if seconds <= 0:
        return None
    return 100.0 * t / seconds
