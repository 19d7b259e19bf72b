"""FP8 e4m3 weights with block scales (the release format of DeepSeek-V4 and Qwen3-FP8).

A release FP8 linear stores ``weight`` as ``float8_e4m3fn`` ``[N, K]`` and one scale per
block of ``B0 x B1`` (128 x 128) weights, ``[ceil(N/B0), ceil(K/B1)]``; the float weight is
``W[n, k] = f32(weight[n, k]) · scale[n // B0, k // B1]``. Scale storage:

* ``"ue8m0"`` (DeepSeek-V4, ``<module>.scale`` ``float8_e8m0fnu``): a power of two
  ``2^(byte - 127)``; byte 255 is NaN;
* ``"bf16"`` / ``"float"`` (Qwen3-FP8's ``weight_scale_inv`` bfloat16; DeepSeek-V3's
  float32): any positive finite value.

Dequantisation is exact in float32 for power-of-two scales (an e4m3 value has a 3-bit
mantissa; a product by 2^e only moves the exponent, down to float32 subnormals); with a
non-power-of-two scale the product is rounded once to float32 (that rounded value is the
golden "dequantized weight").

Writer (:func:`quantize_fp8_blocks`): per block ``amax``; the scale is ``amax / 448``
(e4m3's largest finite value) rounded **up** to the next power of two (ue8m0) or rounded
to the storage dtype and bumped up until ``amax / scale <= 448``; then
``weight = e4m3(W / scale)`` (torch's round-to-nearest-even cast). A zero block gets scale
1 (byte 127). Formats: OCP 8-bit floating point (e4m3fn: bias 7, no infinities, max 448)
and the OCP Microscaling spec's E8M0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["E4M3_MAX", "FP8_SCALE_FORMATS", "e8m0_to_float", "e8m0_from_exponent", "fp8_scale_shape",
           "quantize_fp8_blocks", "dequantize_fp8_blocks", "check_fp8_scale"]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: scale_fmt -> storage dtype of the block scales.
FP8_SCALE_FORMATS = {"ue8m0": torch.float8_e8m0fnu, "bf16": torch.bfloat16, "float": torch.float32}
#: Rows of weights converted at a time (elements), bounds float32 scratch.
_CHUNK = 1 << 24


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales (``float8_e8m0fnu`` or their uint8 bytes) -> float32 ``2^(byte - 127)``
    (byte 0 is 2^-127, a float32 subnormal: exact; byte 255 -> NaN)."""
    b = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s
    if b.dtype != torch.uint8:
        raise TypeError(f"UE8M0 scales must be float8_e8m0fnu or uint8, got {s.dtype}")
    out = torch.ldexp(torch.ones(b.shape, dtype=torch.float32), b.to(torch.int32) - 127)
    return torch.where(b == 255, torch.full_like(out, float("nan")), out)


def e8m0_from_exponent(e: torch.Tensor) -> torch.Tensor:
    """Integer exponents ``e`` in [-127, 127] -> ``float8_e8m0fnu`` scales ``2^e``."""
    return (e.to(torch.int32) + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp8_scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """``[ceil(N / B0), ceil(K / B1)]`` for a weight ``[N, K]`` and blocks ``(B0, B1)``."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def _expand(scale: torch.Tensor, rows: slice, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """float32 per-element scale of weight rows ``rows`` (repeat each block's scale)."""
    r0, r1 = rows.start, rows.stop
    s = scale[r0 // block[0]:(r1 - 1) // block[0] + 1]
    s = s.repeat_interleave(block[0], dim=0)[r0 % block[0]:r0 % block[0] + (r1 - r0)]
    return s.repeat_interleave(block[1], dim=1)[:, :shape[1]]


def _scale_f32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    return scale.float()


def check_fp8_scale(scale: torch.Tensor) -> str | None:
    """The problem with a block-scale tensor's values (NaN, infinite, not positive), or None."""
    s = _scale_f32(scale)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        return (f"expected finite positive block scales, found {int(bad.sum())} bad of {s.numel()} "
                f"(first at block {idx}: {float(s[tuple(idx)])})")
    return None


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``f32(weight) · scale`` per block -> ``dtype`` ``[N, K]`` (float32: exact for UE8M0
    scales; see the module docstring). ``weight`` float8_e4m3fn ``[N, K]``, ``scale``
    ``[ceil(N/B0), ceil(K/B1)]`` (float8_e8m0fnu, uint8 UE8M0 bytes, bf16/f16/f32).
    Converted in row chunks (float32 scratch of at most 64 MiB). Raises ValueError for a
    scale shape that does not match."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    want = fp8_scale_shape(shape, block)
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 block scale must be {list(want)} for a {list(shape)} weight with "
                         f"{list(block)} blocks, got {list(scale.shape)}")
    sf = _scale_f32(scale)
    out = torch.empty(shape, dtype=dtype)
    step = max(block[0], (_CHUNK // max(shape[1], 1)) // block[0] * block[0])
    for r0 in range(0, shape[0], step):
        rows = slice(r0, min(shape[0], r0 + step))
        out[rows] = (weight[rows].float() * _expand(sf, rows, shape, block)).to(dtype)
    return out


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                        scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with block scales of a float weight ``w`` ``[N, K]`` (the module docstring's
    writer). Returns ``(weight float8_e4m3fn [N, K], scale [ceil(N/B0), ceil(K/B1)])`` in
    :data:`FP8_SCALE_FORMATS` ``[scale_fmt]``. Raises ValueError for a non-2-D weight, an
    unknown ``scale_fmt`` or non-finite values."""
    if scale_fmt not in FP8_SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {sorted(FP8_SCALE_FORMATS)}, got {scale_fmt!r}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = int(w.shape[0]), int(w.shape[1])
    sn, sk = fp8_scale_shape((n, k), block)
    # block amax, one block-row at a time
    amax = torch.empty((sn, sk), dtype=torch.float32)
    for i in range(sn):
        a = w[i * block[0]:(i + 1) * block[0]].float().abs()
        if not bool(torch.isfinite(a).all()):
            raise ValueError("cannot quantize a weight with NaN/Inf values to FP8")
        pad = sk * block[1] - k
        if pad:
            a = torch.nn.functional.pad(a, (0, pad))
        amax[i] = a.view(a.shape[0], sk, block[1]).amax(dim=(0, 2))
    if scale_fmt == "ue8m0":
        e = torch.ceil(torch.log2(amax / E4M3_MAX))
        e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(-127, 127)
        scale = e8m0_from_exponent(e)
    else:
        dt = FP8_SCALE_FORMATS[scale_fmt]
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(dt)
        low = (amax / s.float()) > E4M3_MAX  # rounded below amax/448: next value up
        if bool(low.any()):
            bits = s.view(torch.int16 if dt == torch.bfloat16 else torch.int32)
            s = torch.where(low, bits + 1, bits).view(dt)
        scale = s
    sf = _scale_f32(scale)
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn)
    step = max(block[0], (_CHUNK // max(k, 1)) // block[0] * block[0])
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        v = w[rows].float() / _expand(sf, rows, (n, k), block)
        q[rows] = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale
