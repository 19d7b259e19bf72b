"""MXFP4 weights (OCP Microscaling FP4: E2M1 elements, one UE8M0 scale per 32 inputs) and
the golden of the W4A8 GEMM that reads them.

Storage (DeepSeek-V4's routed experts): ``packed`` uint8 ``[N, K/2]``, two E2M1 codes per
byte, element ``2j`` in the **low** nibble and ``2j+1`` in the high one (as DeepSeek's and
transformers' unpackers read them); ``scale`` uint8 ``[N, K/32]``, the UE8M0 bytes
(``2^(byte - 127)``; 255 is NaN and is refused). A code is ``s e1 e0 m``: sign bit 3,
magnitude code 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 (:data:`E2M1_VALUES`).

**Exact integer form.** Twice an E2M1 value is an integer in {0, ±1, ±2, ±3, ±4, ±6, ±8,
±12} (:data:`E2M1_X2`), so ``W[n, k] = w2[n, k] · 2^(byte - 128)`` with ``w2`` int8. Against
INT8 activations quantised per block of 32 (:func:`.group_quant.quant_groups`, the
``int8_g32`` activations), each block's dot product is an exact INT32 sum
(|isum| <= 32·12·127 < 2^14), and the GEMM is the grouped one of
:mod:`.group_quant` with float32 weight scales ``s_w = 2^(byte - 128)``::

    isum[t, n, g] = Σ_{k in block g} q_x[t, k] · w2[n, k]                        exact
    y[t, n] = 0;  for g = 0 .. K/32-1:  y = fl(y + fl(fl(f32(isum) · s_x[t, g]) · s_w[n, g]))

``s_w`` is a power of two, so the last product is exact (barring float32 underflow): the
result differs from the dequantised weight times the dequantised activations only by the
float32 rounding of ``isum · s_x`` and of the running sum. Every W4A8 kernel reproduces
this order bitwise.

Writer (:func:`quantize_mxfp4`): per block ``amax``; scale ``2^ceil(log2(amax / 6))`` (the
smallest power of two that maps the block into E2M1's ±6: no clipping); elements rounded
to the nearest E2M1 value, ties to the even code (round-half-to-even on the mantissa bit);
an all-zero block gets byte 127. Values already on the grid (``e2m1 · 2^e`` with one ``e``
per block whose ``amax`` needs that ``e``) come back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .group_quant import quant_groups

__all__ = ["MXFP4_BLOCK", "E2M1_VALUES", "E2M1_X2", "MXFP4Weight", "quantize_mxfp4", "mxfp4_linear",
           "unpack_e2m1_x2"]

#: Inputs per UE8M0 scale.
MXFP4_BLOCK = 32
#: E2M1 code (0..15) -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: E2M1 code -> twice its value (an exact int8).
E2M1_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_CHUNK = 1 << 22  # rows*K elements unpacked at a time


def unpack_e2m1_x2(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` of E2M1 code pairs -> int8 ``[..., K]`` twice the values (low
    nibble first)."""
    lut = torch.tensor(E2M1_X2, dtype=torch.int8)
    lo = lut[(packed & 0xF).long()]
    hi = lut[(packed >> 4).long()]
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


@dataclass(frozen=True)
class MXFP4Weight:
    """An MXFP4 weight ``[N, K]`` kept 4-bit: ``packed`` uint8 ``[N, K/2]`` (E2M1 code
    pairs, low nibble first) and ``scale`` uint8 ``[N, K/32]`` (UE8M0 bytes). See the module
    docstring. Raises TypeError for another dtype, ValueError for inconsistent shapes."""

    packed: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.scale.dtype != torch.uint8:
            raise TypeError(f"MXFP4 packed codes and UE8M0 scales must be uint8, got {self.packed.dtype} "
                            f"and {self.scale.dtype}")
        if self.packed.dim() != 2:
            raise ValueError(f"packed must be 2-D [out, in/2], got shape {tuple(self.packed.shape)}")
        n, k = self.shape
        if k % MXFP4_BLOCK:
            raise ValueError(f"in features ({k}) must be a multiple of {MXFP4_BLOCK}")
        if tuple(self.scale.shape) != (n, k // MXFP4_BLOCK):
            raise ValueError(f"scale must be [{n}, {k // MXFP4_BLOCK}] for packed {tuple(self.packed.shape)}, "
                             f"got {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        """The logical ``[N, K]``."""
        return torch.Size((self.packed.shape[0], 2 * self.packed.shape[1]))

    @property
    def n_groups(self) -> int:
        return self.shape[1] // MXFP4_BLOCK

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel()

    def scale_f32(self) -> torch.Tensor:
        """float32 ``[N, K/32]`` scales of the doubled integers: ``2^(byte - 128)``."""
        return torch.ldexp(torch.ones(self.scale.shape, dtype=torch.float32), self.scale.to(torch.int32) - 128)

    def int_values(self) -> torch.Tensor:
        """int8 ``[N, K]``: twice the E2M1 values (see :data:`E2M1_X2`)."""
        return unpack_e2m1_x2(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` in ``dtype`` (exact in float32 and bfloat16 unless the scale leaves its
        normal range). Converted in row chunks."""
        n, k = self.shape
        out = torch.empty((n, k), dtype=dtype)
        step = max(1, _CHUNK // k)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            v = unpack_e2m1_x2(self.packed[r0:r1]).float().view(r1 - r0, -1, MXFP4_BLOCK)
            out[r0:r1] = (v * self.scale_f32()[r0:r1, :, None]).view(r1 - r0, k).to(dtype)
        return out


def quantize_mxfp4(w: torch.Tensor) -> MXFP4Weight:
    """MXFP4 of a float weight ``w`` ``[N, K]`` (the module docstring's writer). Raises
    ValueError for a non-2-D weight, ``K % 32 != 0`` or non-finite values."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = int(w.shape[0]), int(w.shape[1])
    if k % MXFP4_BLOCK:
        raise ValueError(f"in features ({k}) must be a multiple of {MXFP4_BLOCK} for MXFP4")
    mags = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    mids = (mags[1:] + mags[:-1]) / 2                           # exact in float32
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scale = torch.empty((n, k // MXFP4_BLOCK), dtype=torch.uint8)
    step = max(1, _CHUNK // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wf = w[r0:r1].float().view(r1 - r0, -1, MXFP4_BLOCK)
        if not bool(torch.isfinite(wf).all()):
            raise ValueError("cannot quantize a weight with NaN/Inf values to MXFP4")
        amax = wf.abs().amax(dim=2, keepdim=True)
        e = torch.ceil(torch.log2(amax / 6.0))
        e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(-127, 127)
        v = (wf / torch.ldexp(torch.ones_like(e), e.to(torch.int32))).abs()
        lo = torch.bucketize(v, mids)                # v on a midpoint -> the lower code
        hi = torch.bucketize(v, mids, right=True)    # ... -> the upper code
        code = torch.where(lo % 2 == 0, lo, hi)      # ties -> the even code (mantissa bit 0)
        code = code + 8 * ((wf < 0) & (code > 0)).long()        # sign (no negative zero)
        code = code.view(r1 - r0, k).to(torch.uint8)
        packed[r0:r1] = code[:, 0::2] | (code[:, 1::2] << 4)
        scale[r0:r1] = (e.squeeze(2) + 127).to(torch.uint8)
    return MXFP4Weight(packed, scale)


def mxfp4_linear(x: torch.Tensor, w: MXFP4Weight) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` with MXFP4 weights and per-32 INT8 activations (the module
    docstring's GEMM) -> float32 ``[..., N]``. Block sums are float32 matmuls of 32-long
    integer dot products (every partial sum an integer below 2^24: exact in any order).
    Raises ValueError when x's last dim is not W's K."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, weight has {k}")
    ng = w.n_groups
    q, s = quant_groups(x, MXFP4_BLOCK)
    lead = x.shape[:-1]
    qx = q.reshape(-1, ng, MXFP4_BLOCK).float()
    sx = s.reshape(-1, ng)
    qw = w.int_values().view(n, ng, MXFP4_BLOCK).float()
    sw = w.scale_f32()
    y = torch.zeros(qx.shape[0], n, dtype=torch.float32)
    for g in range(ng):
        isum = qx[:, g] @ qw[:, g].T
        y = y + (isum * sx[:, g:g + 1]) * sw[:, g]
    return y.reshape(*lead, n)
