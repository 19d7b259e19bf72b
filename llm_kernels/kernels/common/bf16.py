"""bfloat16 <-> float32 bridges (Numba has no bf16 type).

bf16 data travels as ``uint16`` bit patterns: a torch bf16 tensor is viewed zero-copy as a
numpy ``uint16`` array (:func:`torch_bf16_as_u16`) and back (:func:`u16_as_torch_bf16`).

* **Widening** bf16 -> f32 is exact: ``bits32 = uint32(b) << 16``.
* **Narrowing** f32 -> bf16 rounds to nearest, ties to even (what torch's
  ``.to(torch.bfloat16)`` does): with ``b`` the float32 bits,
  ``(b + 0x7FFF + ((b >> 16) & 1)) >> 16``. Adding ``0x7FFF`` carries into bit 16 exactly
  when the dropped 16 bits exceed one half; the ``(b >> 16) & 1`` term turns the exact
  half into a round-up only when the kept LSB is odd. Subnormals round the same way (the
  bit pattern is monotone), overflow past the largest bf16 rounds to ±inf like IEEE, ±inf
  and ±0 map to themselves.
* **NaN**: any NaN input gives a quiet NaN with the same sign (``(b >> 16) | 0x0040``),
  never inf. The exact NaN bit pattern is not specified: torch itself returns ``0x7FC0``
  on its scalar path and ``0xFFFF`` on its AVX-512 path.

Numba has no scalar bitcast, so this module defines two tiny ``@intrinsic`` bitcasts
(:func:`f32_bits`, :func:`f32_from_bits`) that kernels call to convert in registers; they
vectorise like any other instruction. The numpy functions here are the array-level
equivalents for wrappers and tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .jit import njit_kernel

__all__ = [
    "TORCH_BF16_DOT",
    "as_kernel_input",
    "kernel_rows",
    "bf16_bits_to_f32",
    "bf16_to_f32",
    "bf16_to_f32_nb",
    "f32_bits",
    "f32_from_bits",
    "f32_to_bf16",
    "f32_to_bf16_bits",
    "torch_kernel_view",
    "f32_to_bf16_nb",
    "load_f32",
    "torch_bf16_as_u16",
    "u16_as_torch_bf16",
]


def _torch_has_bf16_dot() -> bool:
    """Whether torch's CPU kernels run bf16 matmuls on a native bf16 dot (AVX512_BF16 or
    AMX), from torch's own CPU probes (False if this torch lacks them)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except RuntimeError:
            pass
    return False


#: torch's bf16 matmuls have a native bf16 dot on this CPU. Without one (AVX2 CPUs such as
#: Zen 3) oneDNN's bf16 ``bmm`` is a scalar loop: 6.6 ms for one Flash-dims attention PV
#: (64 x 128 x 512) on Zen 3, 75x the fp32 ``bmm`` of the same bf16 values. Kernels that
#: multiply two bf16 activations go through fp32 there (docs/kernels.md, "bf16 matmuls
#: without a bf16 dot").
TORCH_BF16_DOT: bool = _torch_has_bf16_dot()


# --------------------------------------------------------------------------- intrinsics
@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as its uint32 bit pattern (LLVM ``bitcast``; Numba-only)."""
    if x != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """Reinterpret the low 32 bits of an integer as float32 (LLVM ``trunc``/``zext`` +
    ``bitcast``; Numba-only)."""
    if not isinstance(u, types.Integer):
        return None
    sig = types.float32(u)

    def codegen(context, builder, sig, args):
        v = args[0]
        w = sig.args[0].bitwidth
        if w > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif w < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


# --------------------------------------------------------------------------- scalar helpers
@njit_kernel
def bf16_bits_to_f32(h):
    """bf16 bits (uint16) -> float32, exact. Numba-callable (use inside kernels)."""
    return f32_from_bits(np.uint32(np.uint32(h) << np.uint32(16)))


@njit_kernel
def f32_to_bf16_bits(x):
    """float32 -> bf16 bits (uint16), round-to-nearest-even; NaN -> quiet NaN (sign kept).
    Numba-callable (use inside kernels)."""
    b = f32_bits(np.float32(x))
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x0040))
    lsb = np.uint32((b >> np.uint32(16)) & np.uint32(1))
    r = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + lsb)
    return np.uint16(r >> np.uint32(16))


# --------------------------------------------------------------------------- array functions
def bf16_to_f32(h: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (``uint16`` array, any shape) -> new float32 array, exact.

    Raises TypeError for a non-uint16 array."""
    h = np.asarray(h)
    if h.dtype != np.uint16:
        raise TypeError(f"bf16_to_f32 expects uint16 bf16 bits, got {h.dtype}")
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array (any shape) -> bf16 bit patterns (``uint16``), round-to-nearest-even,
    bit-identical to torch ``.to(torch.bfloat16)`` for every non-NaN input (NaN -> a quiet
    NaN of the same sign). Raises TypeError for a non-float32 array."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"f32_to_bf16 expects float32, got {x.dtype}")
    b = np.ascontiguousarray(x).view(np.uint32)
    r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r = np.where(nan, (b >> np.uint32(16)) | np.uint32(0x0040), r)
    return r.astype(np.uint16)


@njit_kernel
def bf16_to_f32_nb(h, out):
    """Numba kernel: ``out[i] = bf16(h[i])`` for 1-D uint16 ``h`` and float32 ``out`` of the
    same length (the in-kernel bridge, exposed for tests and small wrappers)."""
    for i in range(h.size):
        out[i] = bf16_bits_to_f32(h[i])


@njit_kernel
def f32_to_bf16_nb(x, out):
    """Numba kernel: ``out[i] = bf16_bits(x[i])`` (RNE) for 1-D float32 ``x`` and uint16
    ``out`` of the same length."""
    for i in range(x.size):
        out[i] = f32_to_bf16_bits(x[i])


# --------------------------------------------------------------------------- torch bridges
def torch_bf16_as_u16(t: Any) -> np.ndarray:
    """Zero-copy numpy ``uint16`` view of a CPU ``torch.bfloat16`` tensor (same shape and
    strides; writes through). Raises TypeError for another dtype, ValueError for a non-CPU
    tensor or one that requires grad."""
    import torch

    v = kernel_view_of(t)  # a weight's view registered at load
    if v is not None and v.dtype == np.uint16:
        return v
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16:
        raise TypeError(f"expected a torch.bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")
    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got device {t.device}")
    if t.requires_grad:
        raise ValueError("tensor requires grad; pass t.detach()")
    return t.view(torch.int16).numpy().view(np.uint16)


def u16_as_torch_bf16(a: np.ndarray) -> Any:
    """Zero-copy ``torch.bfloat16`` tensor over a numpy ``uint16`` array of bf16 bits.
    Raises TypeError for another dtype."""
    import torch

    if not isinstance(a, np.ndarray) or a.dtype != np.uint16:
        raise TypeError(f"expected a uint16 numpy array, got {getattr(a, 'dtype', type(a))}")
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


#: ``id(tensor)`` -> (weak reference to the tensor, its kernel view) of the weights given
#: to :func:`attach_kernel_views`; an entry goes when its tensor does. (A registry, not a
#: tensor attribute: ``torch.save`` pickles a tensor's attributes, and a numpy array there
#: would make the file unloadable with ``weights_only=True``.)
KERNEL_VIEWS: dict[int, tuple[Any, np.ndarray]] = {}


def _forget(k: int, r: Any) -> None:
    e = KERNEL_VIEWS.get(k)
    if e is not None and e[0] is r:
        del KERNEL_VIEWS[k]


def attach_kernel_views(tensors: Any) -> int:
    """Load-time preparation of float weights: each C-contiguous float32 or bfloat16 CPU
    tensor of ``tensors`` (an iterable; other objects are skipped) gets its zero-copy
    :func:`torch_kernel_view` (float32, or bf16 bits as ``uint16``) registered in
    :data:`KERNEL_VIEWS`, which :func:`kernel_view_of` (and through it
    :func:`torch_kernel_view`, :func:`torch_bf16_as_u16`, :func:`as_kernel_input` and the
    DeepSeek-V4 wrappers' ``f32_np``) returns instead of converting the tensor on every call
    (~1-4 µs each; ~60 weight conversions per DeepSeek-V4 decode step). The view shares the
    tensor's memory, so in-place writes stay visible; a tensor re-pointed to other storage
    (``t.data = …``, ``set_``) would keep a stale view: weights are never re-pointed after
    load. The registry holds no tensor alive. Returns the number of tensors registered."""
    import weakref

    import torch

    n = 0
    for t in tensors:
        if (isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16) and t.device.type == "cpu"
                and not t.requires_grad and t.is_contiguous()):
            v = t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)
            k = id(t)
            KERNEL_VIEWS[k] = (weakref.ref(t, lambda r, k=k: _forget(k, r)), v)
            n += 1
    return n


def kernel_view_of(t: Any) -> np.ndarray | None:
    """The kernel view :func:`attach_kernel_views` registered for tensor ``t``, else None."""
    e = KERNEL_VIEWS.get(id(t))
    return e[1] if e is not None and e[0]() is t else None


def torch_kernel_view(t: Any) -> np.ndarray:
    """float32 or bf16-bits (``uint16``) numpy view of a CPU tensor, the two element types
    kernels read with :func:`load_f32` (other dtypes are converted to float32)."""
    import torch

    v = kernel_view_of(t)  # a weight's view registered at load
    if v is not None:
        return v
    if t.dtype == torch.float32 and not t.requires_grad and t.is_contiguous():
        return t.numpy()  # the common case without three no-op tensor calls
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return torch_bf16_as_u16(t.contiguous())
    return t.float().contiguous().numpy()


def _c_contig(a: np.ndarray) -> np.ndarray:
    """C-contiguous version of ``a`` (no copy if it already is; keeps 0-d arrays 0-d,
    unlike ``np.ascontiguousarray``)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def as_kernel_input(x: Any, name: str = "x") -> tuple[np.ndarray, bool]:
    """Normalise an activation for the kernels: returns ``(array, is_bf16)``.

    Accepts a CPU torch tensor (float32 or bfloat16; other float dtypes are converted to
    float32) or a numpy array (float32, or uint16 holding bf16 bits). torch tensors are
    viewed zero-copy where possible. The result is C-contiguous.

    Raises TypeError for unsupported dtypes/objects."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32:
            return _c_contig(x), False
        if x.dtype == np.uint16:
            return _c_contig(x), True
        raise TypeError(f"{name}: numpy input must be float32 or uint16 (bf16 bits), got {x.dtype}")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if not x.is_cpu:
            raise TypeError(f"{name}: expected a CPU tensor, got device {x.device}")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            return np.ascontiguousarray(torch_bf16_as_u16(x.contiguous())), True
        if x.dtype != torch.float32:
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name}: expected a floating tensor, got {x.dtype}")
            x = x.float()
        return np.ascontiguousarray(x.contiguous().numpy()), False
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


# --------------------------------------------------------------------------- generic load

def kernel_rows(x: Any, k: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` ``[..., k]`` (any :func:`as_kernel_input` form) as C-contiguous rows ``[T, k]``
    plus the leading shape ``[...]`` to give the output back. Raises ValueError when the last
    dim is not ``k``, TypeError for an unsupported input."""
    a, _ = as_kernel_input(x)
    if a.ndim == 0 or a.shape[-1] != k:
        raise ValueError(f"input last dim must be K={k}, got shape {a.shape}")
    lead = a.shape[:-1]
    return a.reshape(math.prod(lead), k), lead

def load_f32(v):  # pragma: no cover - replaced by the Numba overload below
    """Numba-only: ``float32`` value of an element that is float32 or bf16 bits (uint16)."""
    raise NotImplementedError("load_f32 is only callable from Numba kernels")


from numba.extending import overload


@overload(load_f32, jit_options={"cache": True})
def _load_f32_ov(v):
    if v == types.uint16:
        return lambda v: bf16_bits_to_f32(v)
    if v == types.float32:
        return lambda v: v
    return None


@njit_kernel
def round_f32(v, to_bf16):
    """Numba-callable: float32 ``v`` rounded to bf16 (round-to-nearest-even) and widened back
    when ``to_bf16``, else ``v`` as float32. The storage rounding of every kernel epilogue."""
    if to_bf16:
        return bf16_bits_to_f32(f32_to_bf16_bits(np.float32(v)))
    return np.float32(v)
