"""W8A8 INT8 numerics: the golden of the fast decode path.

* Activations: per-row (per-token) dynamic symmetric INT8. ``amax = max(|row|)`` clamped
  below at 1e-4, ``q = rint(row · 127/amax)`` (round-to-nearest-even, |q| <= 127),
  dequant scale ``s = amax/127`` (float32, one per row).
* Weights: per-output-channel symmetric INT8, same recipe over each output row of
  ``W [out, in]``, plus an explicit clamp to ±127; scale ``[out]`` float32.
* GEMM: exact INT8×INT8 -> INT32 accumulation, then one float32 dequant
  ``y = acc · s_x[row] · s_w[col]``.
* Hadamard: Sylvester-ordered ``H_n / sqrt(n)`` (symmetric, orthonormal), used by the INT8
  lightning indexer on q and on the compressed keys.

Spec: ``shared/design/deepseek_v4_architecture.md`` §0.3 (quant recipes), §6 (wq_b), §8
(INT8 indexer), §9.3 (per-group wo_b), §10 (experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["INT8_MAX", "AMAX_EPS", "QuantWeight", "quant_per_row", "quantize_weight", "int8_matmul",
           "w8a8_linear", "hadamard"]

INT8_MAX = 127.0
AMAX_EPS = 1e-4


@dataclass(frozen=True)
class QuantWeight:
    """A W8 weight: ``qweight`` [out, in] int8 and ``scale`` [out] float32 with
    ``W ≈ qweight · scale[:, None]``."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8:
            raise TypeError(f"qweight must be int8, got {self.qweight.dtype}")
        if self.qweight.dim() != 2 or self.scale.shape != (self.qweight.shape[0],):
            raise ValueError(f"qweight [out, in] and scale [out] expected, got {tuple(self.qweight.shape)} "
                             f"and {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        return self.qweight.float() * self.scale.float()[:, None]


def quant_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic INT8 quant of each row (last dim) of ``x`` [..., K].

    Returns (q int8 [..., K], s float32 [..., 1]) with ``x ≈ q · s``; ``s = amax/127`` where
    amax is clamped below at 1e-4 (an all-zero row quantises to zeros)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS)
    q = torch.round(xf * (INT8_MAX / amax))  # torch.round is round-half-to-even
    return q.to(torch.int8), amax / INT8_MAX


#: Elements of ``w`` converted to float32 at a time by :func:`quantize_weight` (64 MiB).
QUANT_CHUNK = 1 << 24


def quantize_weight(w: torch.Tensor) -> QuantWeight:
    """Per-output-channel INT8 of ``w`` [out, in] (any float dtype) -> QuantWeight:
    ``amax = max|w[n]|`` clamped at 1e-4, ``q = clamp(round(w · (127/amax)), ±127)``,
    ``scale = amax/127``. Rows are converted to float32 in blocks of :data:`QUANT_CHUNK`
    elements (each row is quantised on its own, so the result does not depend on the
    block: a 1 GB bf16 head needs 64 MiB of float32 scratch, not 2 GB)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8)
    s = torch.empty(n, dtype=torch.float32)
    step = max(1, QUANT_CHUNK // max(k, 1))
    for r0 in range(0, n, step):
        wf = w[r0:r0 + step].float()
        amax = wf.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_EPS)
        q[r0:r0 + step] = torch.round(wf * (INT8_MAX / amax)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        s[r0:r0 + step] = (amax / INT8_MAX).squeeze(1)
    return QuantWeight(q, s)


def int8_matmul(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Exact ``qa [..., M, K] @ qb[N, K]ᵀ`` for int8 inputs -> int32 [..., M, N].

    Computed in float64, which is exact while K·127² < 2^53 (K < 5.5e11)."""
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise TypeError(f"int8 inputs expected, got {qa.dtype} and {qb.dtype}")
    return torch.matmul(qa.double(), qb.double().T).to(torch.int32)


def w8a8_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """``x [..., in] @ Wᵀ`` in W8A8: per-row quant of x, exact INT32 GEMM, float32 dequant
    ``acc · s_x · s_w``. Returns float32 [..., out]."""
    q, s = quant_per_row(x)
    acc = int8_matmul(q, w.qweight)
    return acc.float() * s * w.scale.float()


def hadamard(n: int) -> torch.Tensor:
    """Sylvester-ordered Hadamard ``H_n / sqrt(n)`` float32 [n, n]. Raises ValueError unless
    n is a power of two."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5
