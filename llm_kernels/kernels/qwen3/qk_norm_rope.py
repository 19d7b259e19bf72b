"""Fused Qwen3 q/k per-head RMSNorm + rotate-half RoPE + paged KV-cache write.

Golden: :func:`llm_kernels.reference.qwen3.qk_norm_rope.qk_norm_rope` (transformers
``Qwen3Attention.forward``: ``q_norm``/``k_norm`` = ``Qwen3RMSNorm`` over each head's
``head_dim`` lanes, then ``apply_rotary_pos_emb`` with ``rotate_half``), plus the cache
store a paged decode engine does with the new k and v. Per (token t, head) row x of D::

    r  = 1 / sqrt(mean(x²) + eps)                 # float32; Σx² in torch's sum order
    n  = rnd(w · rnd(x · r))                      # Qwen3RMSNorm: weight * hs.to(dtype)
    y  = rnd(rnd(n · cos_t) + rnd(rotate_half(n) · sin_t))
         rotate_half(n) = [-n[D/2:], n[:D/2]]

``rnd`` rounds to bf16 (nearest-even) in bf16 mode and is the identity in fp32 mode. q
rows are returned; k rows are written into ``k_cache`` and the raw v rows into ``v_cache``
at ``slot_mapping[t]`` (block ``slot // block_size``, row ``slot % block_size``).

Bit-exactness: every product and sum is a single float32 operation in the reference's
order (no FMA contraction: ``fastmath`` off), ``rsqrt`` is ``1/sqrt`` like torch's CPU
kernel, and ``Σx²`` uses :func:`common.norm_rope.sumsq_torch_order`, which reproduces
torch's ``pow(2).mean(-1)`` reduction order (ATen ``SumKernel.cpp`` on this torch
build), so outputs and cache rows are bitwise equal to the reference in fp32 and bf16
(asserted by the tests). Should a future torch change its reduction order, the
statistic would move by a few fp32 ulp, i.e. <= 1 bf16 ulp of the outputs.

Parallelism: one ``prange`` over blocks of the ``T·(nq + nkv)`` (token, head) rows; each
row is owned by one iteration (deterministic for any thread count). Plain Numba, no
intrinsics, so there is no separate fallback path (``LLM_KERNELS_FORCE_FALLBACK`` does
not change anything here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from ..common.bf16 import f32_bits, f32_from_bits, f32_to_bf16_bits
from ..common.jit import njit_kernel
from ..common.norm_rope import sumsq_torch_order

__all__ = ["qk_norm_rope_cache"]

_ONE = np.float32(1.0)
_ROWS_PER_BLOCK = 8  # (token, head) rows per prange iteration (scratch reused within)


@njit_kernel
def _rnd(x, to_bf16):
    """``x`` rounded to bf16 (nearest-even, like torch; NaN stays a quiet NaN) when
    ``to_bf16``, else ``x``: ``common.bf16.round_f32`` written branch-free (a select for
    NaN) so that the loops over D vectorise."""
    if not to_bf16:
        return np.float32(x)
    b = f32_bits(np.float32(x))
    r = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + ((b >> np.uint32(16)) & np.uint32(1)))
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return f32_from_bits((b | np.uint32(0x00400000) if nan else r) & np.uint32(0xFFFF0000))


@njit_kernel
def _store(cache, off, y, to_bf16):
    D = y.size
    if to_bf16:
        for i in range(D):
            cache[off + i] = f32_to_bf16_bits(y[i])
    else:
        for i in range(D):
            cache[off + i] = y[i]


@njit_kernel(parallel=True)
def _qk_norm_rope_kernel(q, k, v, wq, wk, cos, sin, eps, to_bf16, kc, vc, slots, nkv, BS, qout):
    """Rows r = t·(nq+nkv) + j: j < nq is q head j (-> qout), else k head j-nq (-> k_cache,
    with v head j-nq copied to v_cache). ``kc``/``vc`` are the flat caches (float32 or
    uint16 bf16 bits)."""
    T = q.shape[0]
    D = wq.size
    nq = q.shape[1] // D
    H = nq + nkv
    R = T * H
    half = D // 2
    nblk = (R + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblk):
        buf = np.empty(D, np.float32)
        nrm = np.empty(D, np.float32)
        y = np.empty(D, np.float32)
        acc = np.empty((4, 32), np.float32)
        for r in range(b * _ROWS_PER_BLOCK, min(R, (b + 1) * _ROWS_PER_BLOCK)):
            t = r // H
            j = r - t * H
            if j < nq:
                src = q[t, j * D:(j + 1) * D]
                w = wq
            else:
                src = k[t, (j - nq) * D:(j - nq + 1) * D]
                w = wk
            for i in range(D):
                buf[i] = src[i]
            ms = np.float32(sumsq_torch_order(buf, acc) / np.float32(D))
            rs = np.float32(_ONE / np.float32(np.sqrt(np.float32(ms + eps))))
            for i in range(D):
                nrm[i] = _rnd(np.float32(w[i] * _rnd(np.float32(buf[i] * rs), to_bf16)), to_bf16)
            cr = cos[t]
            sr = sin[t]
            for i in range(half):
                a = _rnd(np.float32(nrm[i] * cr[i]), to_bf16)
                bb = _rnd(np.float32(-nrm[i + half] * sr[i]), to_bf16)
                y[i] = _rnd(np.float32(a + bb), to_bf16)
            for i in range(half, D):
                a = _rnd(np.float32(nrm[i] * cr[i]), to_bf16)
                bb = _rnd(np.float32(nrm[i - half] * sr[i]), to_bf16)
                y[i] = _rnd(np.float32(a + bb), to_bf16)
            if j < nq:
                for i in range(D):
                    qout[t, j, i] = y[i]
            else:
                kh = j - nq
                s = slots[t]
                off = ((s // BS) * nkv + kh) * BS * D + (s % BS) * D
                _store(kc, off, y, to_bf16)
                _store(vc, off, v[t, kh * D:(kh + 1) * D], to_bf16)


@njit_kernel
def _check_slots(slots, nslots):
    """-> (code, index): 0 ok; 1 slot outside [0, nslots); 2 duplicate slot (two tokens
    would race for one cache row)."""
    T = slots.size
    for t in range(T):
        if slots[t] < 0 or slots[t] >= nslots:
            return 1, t
    if T > 1:
        order = np.argsort(slots)
        for i in range(1, T):
            if slots[order[i]] == slots[order[i - 1]]:
                return 2, order[i]
    return 0, 0


def _f32_2d(x: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    import torch

    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 torch tensor of shape {list(shape)}, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    a = (x.detach() if x.requires_grad else x).numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _weight(w: Any, name: str, D: int) -> np.ndarray:
    import torch

    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch tensor [D={D}], got {getattr(w, 'dtype', type(w).__name__)}")
    if tuple(w.shape) != (D,):
        raise ValueError(f"{name} must have shape [D={D}], got {list(w.shape)}")
    w = w.detach()
    return np.ascontiguousarray((w if w.dtype == torch.float32 else w.float()).numpy())


def _cache(c: Any, name: str, dtype: Any, shape: tuple | None) -> np.ndarray:
    import torch

    if not isinstance(c, torch.Tensor) or c.dim() != 4:
        raise ValueError(f"{name} must be a 4-D torch tensor [num_blocks, nkv, block_size, D], "
                         f"got {list(getattr(c, 'shape', [])) or type(c).__name__}")
    if c.dtype != dtype:
        raise TypeError(f"{name} dtype must be {dtype} (= dtype), got {c.dtype}")
    if shape is not None and tuple(c.shape) != shape:
        raise ValueError(f"{name} shape {list(c.shape)} must equal k_cache's {list(shape)}")
    if c.device.type != "cpu" or not c.is_contiguous() or c.requires_grad:
        raise ValueError(f"{name} must be a contiguous CPU tensor without grad (written in place)")
    if dtype == torch.bfloat16:
        return c.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return c.numpy().reshape(-1)


def qk_norm_rope_cache(q: Any, k: Any, v: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                       eps: float, dtype: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> Any:
    """Per-head q/k RMSNorm + rotate-half RoPE, k/v written into the paged cache.

    Args:
        q: ``[T, nq·D]`` float32 torch tensor holding ``dtype`` values.
        k, v: ``[T, nkv·D]`` float32 torch tensors holding ``dtype`` values.
        q_norm_w, k_norm_w: ``[D]`` torch tensors (any float dtype; used as float32).
        cos, sin: ``[T, D]`` float32 (``reference.qwen3.common.rope_cos_sin``, already
            rounded to ``dtype``).
        eps: RMSNorm epsilon. dtype: ``torch.float32`` or ``torch.bfloat16``.
        k_cache, v_cache: ``[num_blocks, nkv, block_size, D]`` contiguous CPU tensors of
            dtype ``dtype``; written in place.
        slot_mapping: int64 (or int32) ``[T]``: token t's cache slot, block
            ``slot // block_size``, row ``slot % block_size``; distinct, in range.

    Returns:
        q_out ``[T, nq, D]`` float32 holding ``dtype`` values, bitwise equal to the
        reference's q (and the cache rows to its k and to v).

    Raises:
        TypeError: a tensor of the wrong type/dtype (q/k/v/cos/sin not float32, cache dtype
            not ``dtype``, non-integer slot_mapping).
        ValueError: bad ``dtype``, mis-shaped tensors (the message names the tensor and
            the expected shape), odd D, a slot outside ``[0, num_blocks·block_size)`` or a
            repeated slot.
    """
    import torch

    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(q_norm_w, torch.Tensor) or q_norm_w.dim() != 1:
        raise ValueError(f"q_norm_w must be a 1-D torch tensor [D], got {list(getattr(q_norm_w, 'shape', []))}")
    D = int(q_norm_w.shape[0])
    if D < 2 or D % 2:
        raise ValueError(f"head dim D={D} (q_norm_w size) must be even for rotate-half RoPE")
    kc = _cache(k_cache, "k_cache", dtype, None)
    vc = _cache(v_cache, "v_cache", dtype, tuple(k_cache.shape))
    NB, nkv, BS, Dc = k_cache.shape
    if Dc != D:
        raise ValueError(f"k_cache/v_cache head dim {Dc} must equal D={D} (q_norm_w size)")
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] % D or q.shape[1] == 0:
        raise ValueError(f"q must have shape [T, nq·D] with D={D}, got {list(getattr(q, 'shape', []))}")
    T, nqD = q.shape
    nq = nqD // D
    qa = _f32_2d(q, "q", (T, nqD))
    ka = _f32_2d(k, "k", (T, nkv * D))
    va = _f32_2d(v, "v", (T, nkv * D))
    ca = _f32_2d(cos, "cos", (T, D))
    sa = _f32_2d(sin, "sin", (T, D))
    wq = _weight(q_norm_w, "q_norm_w", D)
    wk = _weight(k_norm_w, "k_norm_w", D)
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slot_mapping must be an int64 torch tensor [T={T}], "
                        f"got {getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}")
    if tuple(slot_mapping.shape) != (T,):
        raise ValueError(f"slot_mapping must have shape [T={T}], got {list(slot_mapping.shape)}")
    slots = slot_mapping.numpy().astype(np.int64, copy=False)  # integer tensors never require grad
    code, bad = _check_slots(slots, NB * BS)
    if code == 1:
        raise ValueError(f"slot_mapping[{bad}]={int(slots[bad])} is outside the cache "
                         f"[0, num_blocks·block_size={NB * BS})")
    if code == 2:
        raise ValueError(f"slot_mapping[{bad}]={int(slots[bad])} repeats a slot of another token")
    qout = np.empty((T, nq, D), np.float32)
    if T:
        _qk_norm_rope_kernel(qa, ka, va, wq, wk, ca, sa, np.float32(eps), dtype == torch.bfloat16, kc, vc,
                             slots, nkv, BS, qout)
    return torch.from_numpy(qout)
