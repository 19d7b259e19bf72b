"""Group-scaled INT8 (the ``int8_g32`` scheme): the golden of the grouped INT8 GEMM.

The per-row / per-token scales of W8A8 (:mod:`.quant`) are one scale per 4096 inputs; a
Q8_0-class format keeps one scale per block of ``G`` = 32 inputs, for weights and
activations, which is what llama.cpp's Q8_0 (fp16 scale per 32 weights, activations
quantised per 32 at run time) does. Measured on the Flash-dims test model
(``docs/performance.md``, "INT8 weight classes"): KL against bf16 2.3e-4 with blocks of 32
vs 6.4e-4 with per-row/per-token scales.

* **Weights** ``W [N, K]``, ``K % G == 0``: per row ``n`` and block ``g`` (inputs
  ``[gG, gG+G)``): ``amax = max |w|`` clamped below at 1e-4, the scale
  ``s = amax/127`` rounded to the **nearest float16 value that does not clip** (the
  nearest, or the next one up when ``rint(amax / nearest)`` would exceed 127: only
  possible among float16 subnormals, blocks with ``amax`` < 0.0078), stored as float16 as
  Q8_0's ``d`` (2 bytes per 32 weights); then ``q = clamp(rint(w / s), ±127)`` against that
  stored scale, so the scale's rounding adds no error of its own. Measured on the
  Flash-dims model: a bfloat16 scale (8-bit mantissa) costs 1.8 % more KL, always rounding
  up 0.05 %; either loses to Q8_0.
* **Activations** ``x [..., K]``: each block of ``G`` quantised as one W8A8 row
  (:func:`.quant.quant_per_row`: ``amax`` clamped at 1e-4, ``q = rint(x·fl(fl(1/amax)·127))``,
  ``s_x = amax/127`` float32).
* **GEMM** (exact INT32 block sums, then float32 in block order, no FMA)::

      isum[t, n, g] = Σ_{k in block g} q_x[t, k] · q_w[n, k]          exact (|isum| < 2^24)
      y[t, n] = 0;  for g = 0 .. K/G-1:  y = fl(y + fl(fl(f32(isum) · s_x[t, g]) · s_w[n, g]))

Every fused kernel that reads a :class:`GroupQuantWeight` reproduces this order bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import AMAX_EPS, INT8_MAX, quant_per_row

__all__ = ["GROUP_SIZE", "GroupQuantWeight", "quantize_weight_grouped", "quant_groups", "group_linear",
           "f16_round_up", "f16_scale"]

#: Inputs per scale block (weights and activations), as Q8_0.
GROUP_SIZE = 32

#: Rows of ``w`` converted to float32 at a time by :func:`quantize_weight_grouped` (elements).
_CHUNK = 1 << 24


@dataclass(frozen=True)
class GroupQuantWeight:
    """A group-scaled INT8 weight: ``qweight`` int8 ``[N, K]`` and ``scale`` float16
    ``[N, K // group_size]`` with ``W ≈ qweight · scale`` per block of ``group_size`` inputs.

    Raises TypeError for another dtype, ValueError for inconsistent shapes."""

    qweight: torch.Tensor
    scale: torch.Tensor
    group_size: int = GROUP_SIZE

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8:
            raise TypeError(f"qweight must be int8, got {self.qweight.dtype}")
        if self.scale.dtype != torch.float16:
            raise TypeError(f"scale must be float16 [N, K/{self.group_size}], got {self.scale.dtype}")
        if self.qweight.dim() != 2:
            raise ValueError(f"qweight must be 2-D [out, in], got shape {tuple(self.qweight.shape)}")
        n, k = self.qweight.shape
        if self.group_size <= 0 or self.group_size % 4 or k % self.group_size:
            raise ValueError(f"in features ({k}) must be a multiple of group_size ({self.group_size}, "
                             f"itself a multiple of 4)")
        if tuple(self.scale.shape) != (n, k // self.group_size):
            raise ValueError(f"scale must be [{n}, {k // self.group_size}], got {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def n_groups(self) -> int:
        return self.qweight.shape[1] // self.group_size

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        n, k = self.qweight.shape
        q = self.qweight.float().view(n, -1, self.group_size)
        return (q * self.scale.float()[:, :, None]).view(n, k)


def f16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Positive float32 ``s`` (at most 65504) rounded up to the next float16 value (exact
    when it already is one; subnormals included), returned as float16."""
    s = s.float()
    h = s.to(torch.float16)                         # round to nearest
    low = h.float() < s
    bits = h.contiguous().view(torch.int16)
    return torch.where(low, bits + 1, bits).view(torch.float16)  # next value up: bits + 1 (s > 0)


def f16_scale(amax: torch.Tensor) -> torch.Tensor:
    """float16 block scales for float32 ``amax`` (> 0): ``amax/127`` rounded to nearest,
    bumped to the next float16 value up where ``rint(amax / s)`` would exceed 127."""
    s = amax / INT8_MAX
    h = s.to(torch.float16)
    clip = torch.round(amax / h.float()) > INT8_MAX
    return torch.where(clip, f16_round_up(s), h)


def quantize_weight_grouped(w: torch.Tensor, group_size: int = GROUP_SIZE) -> GroupQuantWeight:
    """Group-scaled INT8 of ``w`` [out, in] (any float dtype), see the module docstring.
    Rows are converted to float32 in blocks of 2^24 elements (the result does not depend
    on the block). Raises ValueError for a non-2-D weight or ``in % group_size != 0``."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or group_size % 4 or k % group_size:
        raise ValueError(f"in features ({k}) must be a multiple of group_size ({group_size}, itself a "
                         f"multiple of 4)")
    ng = k // group_size
    q = torch.empty((n, k), dtype=torch.int8)
    s = torch.empty((n, ng), dtype=torch.float16)
    step = max(1, _CHUNK // max(k, 1))
    for r0 in range(0, n, step):
        wf = w[r0:r0 + step].float().view(-1, ng, group_size)
        amax = wf.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_EPS)
        sc = f16_scale(amax)
        q[r0:r0 + step] = torch.round(wf / sc.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).view(-1, k)
        s[r0:r0 + step] = sc.squeeze(2)
    return GroupQuantWeight(q, s, group_size)


def quant_groups(x: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic INT8 of each block of ``group_size`` inputs of ``x`` [..., K] (each block as
    one :func:`.quant.quant_per_row` row). Returns (q int8 [..., K], s float32 [..., K/G]).
    Raises ValueError when K is not a multiple of ``group_size``."""
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"last dim ({k}) must be a multiple of group_size ({group_size})")
    q, s = quant_per_row(x.reshape(*x.shape[:-1], k // group_size, group_size))
    return q.reshape(x.shape), s.squeeze(-1)


def group_linear(x: torch.Tensor, w: GroupQuantWeight) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` with group-scaled INT8 weights and activations (the module
    docstring's GEMM) -> float32 [..., N]. The block sums are float32 matmuls of 32-long
    integer dot products (every partial sum an integer below 2^24: exact in any order).
    Raises ValueError when x's last dim is not W's K."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, weight has {k}")
    g_sz, ng = w.group_size, w.n_groups
    q, s = quant_groups(x, g_sz)
    lead = x.shape[:-1]
    qx = q.reshape(-1, ng, g_sz).float()
    sx = s.reshape(-1, ng)
    qw = w.qweight.view(n, ng, g_sz).float()
    sw = w.scale.float()
    y = torch.zeros(qx.shape[0], n, dtype=torch.float32)
    for g in range(ng):
        isum = qx[:, g] @ qw[:, g].T
        y = y + (isum * sx[:, g:g + 1]) * sw[:, g]
    return y.reshape(*lead, n)
