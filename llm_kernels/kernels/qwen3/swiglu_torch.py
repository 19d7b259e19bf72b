"""SwiGLU bitwise with torch's fp32 ``silu``: which elements torch computes with SLEEF's
vector ``expf`` and which with libm's scalar ``expf`` (the tail of each thread's chunk),
and the scalar ``rnd(rnd(silu(g))·u)`` used by the fused ``gate_up_swiglu`` epilogues.

Source: torch ``aten/src/ATen/native/cpu`` (TensorIterator + ``at::parallel_for`` with
``GRAIN_SIZE`` 32768, vectorised loops of 2 vectors); reference ``mlp.gate_up_swiglu``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..common.bf16 import round_f32 as rnd
from ..common.jit import njit_kernel
from ..common.vecmath import sleef_expf as _sleef_expf

__all__ = ["in_tail", "swiglu_scalar", "torch_tails"]

_ONE = np.float32(1.0)
_GRAIN = 32768  # at::internal::GRAIN_SIZE


@njit_kernel
def swiglu_scalar(g, u, to_bf16, libm):
    """``rnd(rnd(silu(g))·u)`` for rounded g, u (reference ``gate_up_swiglu``) with torch's
    fp32 ``silu`` = ``x/(1+exp(-x))``: SLEEF ``expf`` (its vectorised loop) or, ``libm``,
    the C library's ``expf`` (its scalar tail, see :func:`torch_tails`)."""
    e = np.float32(math.exp(-g)) if libm else _sleef_expf(-g)
    return rnd(np.float32(rnd(np.float32(g / np.float32(_ONE + e)), to_bf16) * u), to_bf16)


@njit_kernel
def in_tail(f, tails):
    """Whether flat element ``f`` of the SwiGLU output lies in one of torch's scalar tails."""
    for k in range(tails.shape[0]):
        if f >= tails[k, 0] and f < tails[k, 1]:
            return True
    return False


def torch_tails(numel: int) -> np.ndarray:
    """Flat ``[lo, hi)`` ranges (int64 ``[n, 2]``) where torch's fp32 ``silu`` on a contiguous
    tensor of ``numel`` elements runs its scalar op (libm ``expf``) instead of the SLEEF vector
    op: TensorIterator splits ``[0, numel)`` into ``at::parallel_for`` chunks (grain 32768,
    ``torch.get_num_threads()``), and each chunk's vectorised loop (blocks of 2 vectors: 32
    floats on AVX-512, 16 on AVX2) leaves its last ``len % block`` elements to the scalar op.
    Without a SLEEF build (other capabilities) every element is scalar. Cached."""
    return _torch_tails(numel, torch.get_num_threads())


@functools.lru_cache(maxsize=256)
def _torch_tails(numel: int, nt: int) -> np.ndarray:
    cap = str(torch.backends.cpu.get_cpu_capability())
    blk = 32 if cap.startswith("AVX512") else (16 if cap == "AVX2" else 0)
    if blk == 0:
        return np.array([[0, numel]], np.int64)
    if numel < _GRAIN or nt == 1:
        chunks = [(0, numel)]
    else:
        nt = min(nt, -(-numel // _GRAIN))
        ch = -(-numel // nt)
        chunks = [(c * ch, min(numel, (c + 1) * ch)) for c in range(nt) if c * ch < numel]
    return np.array([[lo + (hi - lo) // blk * blk, hi] for lo, hi in chunks], np.int64).reshape(-1, 2)
