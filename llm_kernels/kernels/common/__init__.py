"""Numba kernel foundation shared by all model kernels (see ``docs/kernels.md``).

Import order matters: :mod:`.jit` is imported first so that ``NUMBA_CACHE_DIR`` (keyed on
a hash of every kernel source) and the OpenMP threading layer are configured before any
kernel is compiled. Model kernels should decorate with :func:`jit.njit_kernel`.

Modules:

* :mod:`.jit` — CPU tiers (``plain`` < ``avx2`` < ``avx512-vnni`` < ``avx512-vnni-bf16``,
  ``LLM_KERNELS_TIER``, ``LLM_KERNELS_FORCE_FALLBACK``), cache keying, ``njit_kernel``.
* :mod:`.bf16` — bf16 <-> fp32 bridges (RNE), zero-copy torch views.
* :mod:`.quant` — per-row dynamic INT8 quantisation (bit-exact golden).
* :mod:`.gemm` — W8A8 GEMM (VNNI intrinsic kernels + plain fallback), ``W8A8Linear``.
* :mod:`.gemm_mxfp4` — W4A8 GEMM on MXFP4 weights kept 4-bit (``pack_mxfp4``,
  ``mxfp4_gemm_linear``; intrinsics in :mod:`.x86_w4a8`), bitwise ``numerics.mxfp4``.
* :mod:`.gemm_pack` — W8A8 weight packing (``PackedW8A8``, ``pack_w8a8``, ``unpack_w8a8``).
* :mod:`.prepared` — the load-time prepared-weight types (``PackedLinear``, ``PackedRows``,
  ``PackedColumnGroups``: ``QuantWeight`` s holding only the packed layout).
* :mod:`.norm_rope` — fused RMSNorm + interleaved RoPE.
* :mod:`.topk` — stable top-k indices with -inf masking.
* :mod:`.x86` — llvmlite intrinsics (``vpdpbusd`` register tiles, ``vdpbf16ps`` dot tiles).
* :mod:`.x86_avx2` — the AVX2 INT8 register tile and ``int8_bcast_tile``, the one seam
  choosing the process's INT8 tile.
* :mod:`.vecmath` — ``fma32``, SLEEF ``expf``, torch's 16-lane reduction order (bitwise torch).
"""

from . import jit  # noqa: F401  (first: configures numba before anything compiles)
from .bf16 import bf16_to_f32, f32_to_bf16, torch_bf16_as_u16, u16_as_torch_bf16
from .gemm import (
                   PackedW8A8,
                   W8A8Linear,
                   pack_w8a8,
                   w8a8_gemm,
                   w8a8_gemm_fallback,
                   w8a8_gemm_i32,
                   w8a8_gemm_i32_fallback,
                   w8a8_gemm_i32_vnni,
                   w8a8_gemm_vnni,
)
from .jit import (
                   FORCE_FALLBACK,
                   HAS_AVX512BF16,
                   HAS_VNNI,
                   dispatch_info,
                   dispatch_path,
                   njit_kernel,
)
from .norm_rope import apply_rope, rms_norm, rms_norm_rope
from .quant import quant_rows
from .topk import topk_indices

__all__ = [
                   "FORCE_FALLBACK",
                   "HAS_AVX512BF16",
                   "HAS_VNNI",
                   "PackedW8A8",
                   "W8A8Linear",
                   "apply_rope",
                   "bf16_to_f32",
                   "dispatch_info",
                   "dispatch_path",
                   "f32_to_bf16",
                   "njit_kernel",
                   "pack_w8a8",
                   "quant_rows",
                   "rms_norm",
                   "rms_norm_rope",
                   "topk_indices",
                   "torch_bf16_as_u16",
                   "u16_as_torch_bf16",
                   "w8a8_gemm",
                   "w8a8_gemm_fallback",
                   "w8a8_gemm_i32",
                   "w8a8_gemm_i32_fallback",
                   "w8a8_gemm_i32_vnni",
                   "w8a8_gemm_vnni",
]
