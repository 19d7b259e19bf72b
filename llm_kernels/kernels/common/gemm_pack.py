"""W8A8 weight packing: :class:`PackedW8A8` and :func:`pack_w8a8` (the load-time side of
:mod:`.gemm`), and :func:`unpack_w8a8`, its inverse.

Layouts (see :mod:`.gemm` for the kernels that read them):

* ``"vnni"``: "broadcast" form ``[Np/16][Kp/4][16][4]`` int8 (one 64-byte zmm = 4
  consecutive k of 16 output channels), ``Kp`` = K rounded up to 4, ``Np`` = N rounded up to
  :data:`CHUNK_N` (zero padding). A copy of the weight.
* ``"nk"``: the C-contiguous ``[N, K]`` int8 weight itself (a view when the source is
  contiguous: no copy).

* ``"avx2"``: the same bytes as ``"vnni"``, read by the AVX2 register tiles
  (:mod:`.x86_avx2`); only its zero point differs (below).

All carry the per-channel float32 scales and the int32 row sums ``Σ_k q_w[n, k]``, and
``wsum128 = zero_point(layout) · wsum``, the term every epilogue subtracts from the tile's
int32 result: the VNNI tile multiplies ``u8 = q + 128`` activations (``Σ (q+128)·w =
acc + 128·Σ w``: zero point 128); the AVX2 tile sign-folds back to ``q`` and returns the
exact ``Σ q·w`` (zero point 0, ``wsum128`` all zeros); ``"nk"`` has zero point 0 too.
A packed layout is usable only in a process whose tile (:data:`jit.INT8_TILE`) it names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from . import jit
from .jit import njit_kernel
from .x86 import VNNI_NB

__all__ = ["ACT_OFFSET", "CHUNK_N", "MAX_K_PLAIN", "MAX_K_VNNI", "TILED_LAYOUTS", "PackedW8A8", "act_offset",
           "as_numpy", "is_tiled", "pack_w8a8", "unpack_w8a8", "zero_point"]

#: Packed (broadcast) layouts, one per INT8 register tile; ``"nk"`` is the plain one.
TILED_LAYOUTS = ("vnni", "avx2")


def is_tiled(layout: str) -> bool:
    """True for a broadcast-packed layout (read by the register-tile kernels), False for ``"nk"``."""
    return layout in TILED_LAYOUTS


def zero_point(layout: str | None) -> int:
    """Activation zero point of a layout's kernel: 128 for ``"vnni"`` (``u8 = q + 128``), 0
    for ``"avx2"`` (sign-folded, exact ``Σ q·w``) and ``"nk"``; ``None`` (no INT8 tile on
    this CPU) gives 128, the VNNI tile's (never compiled then)."""
    return 0 if layout in ("avx2", "nk") else 128


def act_offset(tile: str | None) -> int:
    """The byte added to an activation ``q`` in the packed ``[K/4][T][4]`` broadcast layout
    of an INT8 tile: 128 for ``"vnni"`` (``u8 = q + 128 = q ^ 0x80``, ``vpdpbusd``'s
    unsigned operand), 0 for ``"avx2"`` (the signed ``q`` itself: the sign-folding tile
    needs no conversion per token); ``None`` gives the VNNI one (never read then). Equal
    to :func:`zero_point` of the tile's layout."""
    return zero_point(tile)


#: :func:`act_offset` of this process's INT8 tile (``jit.INT8_TILE``).
ACT_OFFSET = act_offset(jit.INT8_TILE)

#: Output columns per parallel work item of the VNNI kernel (4 zmm blocks of 16); the
#: ``"vnni"`` layout pads N to a multiple of it.
CHUNK_N = 16 * VNNI_NB
#: Largest K with exact int32 accumulation: ``255·127·K < 2^31`` (VNNI, u8 x s8) and
#: ``127·127·K < 2^31`` (plain kernel, s8 x s8).
MAX_K_VNNI = 66_000
MAX_K_PLAIN = 133_000

def aligned_empty(n: int, dtype: Any, align: int = 64) -> np.ndarray:
    """1-D uninitialised array of ``n`` elements whose data pointer is ``align``-aligned."""
    dt = np.dtype(dtype)
    raw = np.empty(n * dt.itemsize + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n * dt.itemsize].view(dt)


# --------------------------------------------------------------------------- packing kernels
@njit_kernel(parallel=True)
def _pack_w_bcast(wq, wp, KG, NBLK):
    N, K = wq.shape
    for blk in prange(NBLK):
        for kg in range(KG):
            base = (blk * KG + kg) * 64
            for l in range(16):
                n = blk * 16 + l
                for b in range(4):
                    k = kg * 4 + b
                    v = np.int8(0)
                    if n < N and k < K:
                        v = wq[n, k]
                    wp[base + 4 * l + b] = v


@njit_kernel(parallel=True)
def pack_w_bcast32(w32, wp32, KG, NBLK):
    """Fast path of :func:`_pack_w_bcast` for K % 4 == 0: moves 4-byte k-groups as uint32
    (``w32`` = the weight viewed as uint32 [N, K/4]); rows >= N are zero."""
    N = w32.shape[0]
    for blk in prange(NBLK):
        base = blk * KG * 16
        for l in range(16):
            n = blk * 16 + l
            if n < N:
                row = w32[n]
                for kg in range(KG):
                    wp32[base + kg * 16 + l] = row[kg]
            else:
                for kg in range(KG):
                    wp32[base + kg * 16 + l] = np.uint32(0)


@njit_kernel(parallel=True)
def _row_sums(wq, out):
    K = wq.shape[1]
    for n in prange(wq.shape[0]):
        wr = wq[n]
        s = np.int32(0)
        for k in range(K):
            s = np.int32(s + np.int32(wr[k]))
        out[n] = s


# --------------------------------------------------------------------------- packed weight
class PackedW8A8:
    """A W8 weight prepared for :func:`w8a8_gemm`.

    Attributes:
        n, k: logical shape ``[N, K]`` of the weight.
        layout: ``"vnni"`` (broadcast-packed, ``data`` int8 1-D ``Np*Kp``) or ``"nk"``
            (``data`` = the C-contiguous ``[N, K]`` int8 weight).
        scale: float32 ``[N]`` per-output-channel scales.
        wsum: int32 ``[N]`` row sums ``Σ_k q_w[n, k]``.
        wsum128: int32 ``[np_]`` = ``zero_point(layout) · wsum`` (zero-padded): what the
            epilogues subtract (``128·wsum`` for ``"vnni"``, zeros for ``"avx2"``/``"nk"``).
        kp, np_: padded K (multiple of 4) and N (multiple of 64) of the packed layouts.
    """

    __slots__ = ("data", "k", "kp", "layout", "n", "np_", "scale", "wsum", "wsum128")

    def __init__(self, n, k, layout, data, scale, wsum, kp, np_):
        self.n, self.k, self.layout, self.data = n, k, layout, data
        self.scale, self.wsum, self.kp, self.np_ = scale, wsum, kp, np_
        self.wsum128 = np.zeros(np_, np.int32)
        self.wsum128[:n] = wsum * np.int32(zero_point(layout))

    @property
    def nbytes(self) -> int:
        """Bytes of the weight payload (excluding scales/sums)."""
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        return f"PackedW8A8(N={self.n}, K={self.k}, layout={self.layout!r})"


def as_numpy(a: Any, name: str) -> np.ndarray:
    """A CPU torch tensor (contiguous, detached) or a numpy array as numpy; TypeError otherwise."""
    try:
        import torch
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                raise TypeError(f"{name}: expected a CPU tensor, got {a.device}")
            return a.detach().contiguous().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(a).__name__}")
    return a


def _check_qweight(qweight: Any, scale: Any) -> tuple[np.ndarray, np.ndarray]:
    w = as_numpy(qweight, "qweight")
    s = as_numpy(scale, "scale")
    if w.dtype != np.int8 or w.ndim != 2:
        raise TypeError(f"qweight must be 2-D int8 [N, K], got {w.dtype} {w.shape}")
    if s.shape != (w.shape[0],) or s.dtype != np.float32:
        raise ValueError(f"scale must be float32 [N={w.shape[0]}], got {s.dtype} {s.shape}")
    return np.ascontiguousarray(w), np.ascontiguousarray(s)


def pack_w8a8(qweight: Any, scale: Any, layout: str | None = None) -> PackedW8A8:
    """Prepare an INT8 weight for :func:`w8a8_gemm`.

    Args:
        qweight: int8 ``[N, K]`` (``nn.Linear`` layout; numpy or CPU torch), e.g.
            ``QuantWeight.qweight`` of the golden ``quantize_weight``.
        scale: float32 ``[N]`` per-output-channel scales.
        layout: ``"vnni"`` / ``"avx2"`` (broadcast-packed for the register-tile kernels,
            only the process's :data:`jit.INT8_TILE`), ``"nk"`` (plain, for the fallback
            kernel) or ``None`` = the active dispatch path (:func:`jit.dispatch_path`).

    Returns:
        :class:`PackedW8A8` (the ``"vnni"`` layout copies the weight; ``"nk"`` keeps a
        contiguous view/copy of it).

    Raises:
        TypeError/ValueError: bad dtypes/shapes; ValueError for a packed layout with
        K > 66000, for ``"nk"`` with K > 133000, or an unknown layout;
        RuntimeError for a packed layout other than this process's tile (e.g. ``"vnni"`` on
        a CPU without AVX512-VNNI or under ``LLM_KERNELS_TIER=avx2``).
    """
    w, s = _check_qweight(qweight, scale)
    N, K = w.shape
    layout = jit.dispatch_path() if layout is None else layout
    if layout == "fallback":
        layout = "nk"
    wsum = np.empty(N, np.int32)
    if N:
        _row_sums(w, wsum)
    if is_tiled(layout):
        if layout != jit.INT8_TILE:
            raise RuntimeError(f"layout={layout!r} needs the {layout} INT8 tile; this process compiles "
                               f"{jit.INT8_TILE or 'none'} (tier {jit.TIER}, CPU best {jit.CPU_TIER}, "
                               f"{jit.TIER_ENV}={jit.dispatch_info()['tier_env']!r})")
        if K > MAX_K_VNNI:
            raise ValueError(f"K={K} too large for exact int32 accumulation of u8*s8 (max {MAX_K_VNNI})")
        kp = max(4, -(-K // 4) * 4)
        np_ = max(CHUNK_N, -(-N // CHUNK_N) * CHUNK_N)
        wp = aligned_empty(np_ * kp, np.int8)
        if K % 4 == 0 and K:
            pack_w_bcast32(w.view(np.uint32), wp.view(np.uint32), kp // 4, np_ // 16)
        else:
            _pack_w_bcast(w, wp, kp // 4, np_ // 16)
        return PackedW8A8(N, K, layout, wp, s, wsum, kp, np_)
    if layout == "nk":
        if K > MAX_K_PLAIN:
            raise ValueError(f"K={K} too large for exact int32 accumulation (max {MAX_K_PLAIN})")
        return PackedW8A8(N, K, "nk", w, s, wsum, K, N)
    raise ValueError(f"unknown layout {layout!r} (expected 'vnni', 'avx2', 'nk' or None)")


def unpack_w8a8(pw: PackedW8A8) -> np.ndarray:
    """The int8 ``[N, K]`` weight a :class:`PackedW8A8` was packed from (the inverse of
    :func:`pack_w8a8`): the ``"nk"`` data itself, or a new array rebuilt from a packed
    (``"vnni"``/``"avx2"``) layout. For reference/fallback paths only; no kernel reads it."""
    if pw.layout == "nk":
        return pw.data
    t = pw.data.reshape(pw.np_ // 16, pw.kp // 4, 16, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(pw.np_, pw.kp)[:pw.n, :pw.k])

