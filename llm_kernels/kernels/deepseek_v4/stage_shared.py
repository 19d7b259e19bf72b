"""Helpers shared by the fused ``qkv_proj_rope``, ``compressor`` and ``indexer`` kernels:
the single-token bf16/fp32 GEMV (``linear_pair``) and scalar epilogue pieces in the
reference's operation order (torch-order ``Σx²``, weighted / unweighted RMSNorm,
interleaved RoPE, fast Walsh-Hadamard, torch's column-sum order). The W8A8 per-head
drivers are in :mod:`.w8a8_heads`.

Numerics and determinism rules: see :mod:`.qkv_proj_rope`.
"""


from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from ...numerics.quant import QuantWeight

from ..common.bf16 import KERNEL_VIEWS, load_f32
from ..common.bf16 import round_f32 as rnd
from ..common.jit import njit_kernel
from ..common.norm_rope import ceil_log2, sumsq_torch_order
from ..common.gemm import pack_w8a8, w8a8_linear
from ..common.linear import linear as fused_linear
from ..common.prepared import PackedLinear, PackedRows, is_int8_weight, stage_group

#: Calls of up to this many rows (decode and speculative verify steps) compute each row
#: alone where a batched float op would round a row differently with other rows present:
#: the router's logits (:func:`.gate.router_logits`) and the attention's gather width
#: (:func:`.sparse_attn.sparse_attn_core`). Larger calls (prefill) run batched.
ROW_INVARIANT_ROWS = 64

# --------------------------------------------------------------------------- host helpers


def f32_np(t: Any) -> np.ndarray:
    """C-contiguous float32 numpy view (copy only when needed) of a CPU tensor; a weight's
    view registered at load (:func:`~..common.bf16.attach_kernel_views`) without a tensor
    call."""
    e = KERNEL_VIEWS.get(id(t))
    if e is not None and e[1].dtype == np.float32 and e[0]() is t:
        return e[1]
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    if t.dtype == torch.float32 and not t.requires_grad and t.is_contiguous():
        return t.numpy()  # the common case without three no-op tensor calls
    return t.detach().float().contiguous().numpy()


def i64_np(t: Any) -> np.ndarray:
    """C-contiguous int64 numpy view (copy only when needed) of a CPU integer tensor
    (positions, token ids, index lists; integer tensors never require grad)."""
    if t.dtype == torch.int64 and t.is_contiguous():
        return t.numpy()
    return t.detach().to(torch.int64).contiguous().numpy()


class PairPack:
    """The packed ``[w1; w2]`` of a :func:`linear_pair` stage whose two weights are per-row
    INT8 with the same K (``wq_a`` | ``wkv``, a compressor's ``wkv`` | ``wgate``): one GEMM,
    one activation quantisation, rows ``[0, n1)`` = w1 and ``[n1, n1 + n2)`` = w2."""

    __slots__ = ("n1", "packed")
    n_members = 2

    def __init__(self, packed, n1: int):
        self.packed, self.n1 = packed, int(n1)


def pack_pair(w1: Any, w2: Any) -> tuple[PackedRows, PackedRows] | None:
    """Load-time form of a :func:`linear_pair` stage's two per-row INT8 weights (prepared
    ``PackedLinear`` or plain ``QuantWeight``, same K): two :class:`PackedRows` of one
    :class:`PairPack`; None when they are not such a pair (float, group-scaled, other K)."""
    ok = all(isinstance(w, (PackedLinear, QuantWeight)) and not isinstance(w, PackedRows) for w in (w1, w2))
    if not ok or w1.shape[1] != w2.shape[1]:
        return None
    n1, n2 = w1.shape[0], w2.shape[0]
    q = torch.cat([w1.qweight, w2.qweight], 0)
    s = torch.cat([w1.scale.float(), w2.scale.float()], 0)
    g = PairPack(pack_w8a8(q, s), n1)
    return (PackedRows(g, 0, g.packed, w1.scale, n1), PackedRows(g, 1, g.packed, w2.scale, n2, start=n1))


def _pair_linear(x: torch.Tensor, w: Any, dtype: torch.dtype) -> torch.Tensor:
    return fused_linear(x, w, dtype) if is_int8_weight(w) else float_linear(x, w, dtype)


def float_linear(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference ``linear`` for a float weight (torch GEMM, one rounding to ``dtype``)."""
    if dtype == torch.float32:
        return F.linear(x.float(), w.float())
    return F.linear(x.to(dtype), w.to(dtype)).float()


#: Token counts up to which the Numba GEMV replaces torch for float weights. Measured on
#: the 2-core Zen 4 box (bf16 weights streamed from DRAM): one token, Flash wq_a + wkv
#: (12 MiB) 0.19-0.29 ms vs torch 0.51-0.67 ms, wq_b (64 MiB) 1.8 vs 2.6 ms (37 vs 26 GB/s);
#: a 2-4-token variant sharing each weight load lost to torch at T=2 (0.77 vs 0.68 ms)
#: and T=8 (1.05 vs 0.62): oneDNN's AVX512_BF16 kernel wins once the GEMM is not purely
#: bandwidth bound.
GEMV_MAX_T = 1


def _gemv_weight(w: Any, dtype: torch.dtype) -> np.ndarray | None:
    """Zero-copy numpy view of a float weight for :func:`_gemv_pair` (bf16 as uint16 bits),
    or None when the reference would convert it (a float32 weight in a bf16 run is rounded
    to bf16 by the reference's ``w.to(dtype)``) or it is not a plain CPU tensor."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type != "cpu" or w.requires_grad:
        return None
    if w.dtype == torch.bfloat16:
        return w.contiguous().view(torch.int16).numpy().view(np.uint16)
    if w.dtype == torch.float32 and dtype == torch.float32:
        return w.contiguous().numpy()
    return None


_NO_APE = np.zeros((1, 1), np.float32)
_NO_SLOTS = np.zeros(1, np.int64)


def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, dtype: torch.dtype,
                ape: np.ndarray | None = None, slots: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``rnd(x @ w1ᵀ)`` and ``rnd(x @ w2ᵀ) (+ ape[slots])`` (same K) as float32 numpy
    arrays. Float weights: one Numba GEMV call for ``T <= GEMV_MAX_T`` (both weights in
    one parallel loop, bf16 widened in registers), else torch (the reference's GEMM).
    INT8 weights (:class:`QuantWeight`, the ``int8`` scheme; prepared at load as
    :class:`~..common.prepared.PackedLinear`): the fused W8A8 ``linear`` of each
    (per-token INT8 quantisation, exact INT32 GEMM, the golden's dequant order), bitwise
    equal to the reference's ``rnd(w8a8_linear(x, w))``."""
    T = x.shape[0]
    g = stage_group((w1, w2), PairPack) if w2 is not None else None
    if g is not None:  # a prepared INT8 pair: one GEMM over [w1; w2]
        y = w8a8_linear(f32_np(x) if x.dtype == torch.float32 else x.detach(), g.packed)
        y = y if isinstance(y, np.ndarray) else y.numpy()
        y1 = np.empty((T, g.n1), np.float32)
        y2 = np.empty((T, y.shape[1] - g.n1), np.float32)
        split_round(y, dtype == torch.bfloat16, y1, y2)
        if ape is not None and T:
            add_ape(y2, ape, slots)
        return y1, y2
    if is_int8_weight(w1) or is_int8_weight(w2):
        y1 = f32_np(_pair_linear(x, w1, dtype))
        if w2 is None:
            return y1, None
        y2 = f32_np(_pair_linear(x, w2, dtype))  # a fresh tensor's buffer: ape added in place
        if ape is not None and T:
            add_ape(y2, ape, slots)
        return y1, y2
    a1 = _gemv_weight(w1, dtype) if T <= GEMV_MAX_T else None
    a2 = None
    if a1 is not None and w2 is not None:
        a2 = _gemv_weight(w2, dtype)
        if a2 is None or a2.dtype != a1.dtype or a2.shape[1] != a1.shape[1]:
            a1 = None
    if a1 is not None and T > 0:
        xr = x.to(dtype).float() if dtype == torch.bfloat16 else x.float()
        xn = xr.contiguous().numpy()
        if a2 is None:
            a2 = a1[:0]
        o1 = np.empty((T, a1.shape[0]), np.float32)
        o2 = np.empty((T, a2.shape[0]), np.float32)
        add = ape is not None
        _gemv_pair(xn, a1, a2, dtype == torch.bfloat16, o1, o2, ape if add else _NO_APE,
                   slots if add else _NO_SLOTS, add)
        return o1, (o2 if w2 is not None else None)
    y1 = f32_np(float_linear(x, w1, dtype))
    if w2 is None:
        return y1, None
    y2 = f32_np(float_linear(x, w2, dtype))  # a fresh tensor's buffer: ape added in place
    if ape is not None and T:
        add_ape(y2, ape, slots)
    return y1, y2


@njit_kernel
def split_round(y, to_bf16, o1, o2):
    """``o1 = rnd(y[:, :n1])``, ``o2 = rnd(y[:, n1:])`` with ``n1 = o1.shape[1]`` (``rnd``:
    round to nearest even bf16 when ``to_bf16``, torch's ``.to(bfloat16)``, else a copy)."""
    T, n1 = o1.shape
    n2 = o2.shape[1]
    for t in range(T):
        a, b1, b2 = y[t], o1[t], o2[t]
        for i in range(n1):
            b1[i] = rnd(a[i], to_bf16)
        c = a[n1:]
        for i in range(n2):
            b2[i] = rnd(c[i], to_bf16)


@njit_kernel
def add_ape(score, ape, slots):
    """``score[t, :] += ape[slots[t], :]`` in place (one token row per iteration)."""
    T, C = score.shape
    for t in range(T):
        a = ape[slots[t]]
        for i in range(C):
            score[t, i] = np.float32(score[t, i] + a[i])


@njit_kernel(fastmath={"reassoc", "nsz", "contract"})
def _dot_w(xr, wr):
    """fp32 dot product of an activation row with a float32 / bf16-bits weight row
    (``reassoc``/``contract``: the compiler vectorises the reduction with FMAs, in an
    order fixed at compile time)."""
    acc = np.float32(0.0)
    for k in range(wr.size):
        acc += xr[k] * load_f32(wr[k])
    return acc


@njit_kernel(parallel=True)
def _gemv_pair(x, w1, w2, to_bf16, out1, out2, ape, slots, with_ape):
    """``out1 = rnd(x @ w1ᵀ)``, ``out2 = rnd(x @ w2ᵀ) (+ ape[slots[t]])`` for a single (or
    a few) tokens: one output channel per ``prange`` iteration over both weights (one
    launch, one pass over each weight row); fp32 accumulation in a fixed order,
    identical for every thread count. Weights: float32 or bf16 bits (uint16)."""
    T = x.shape[0]
    N1 = w1.shape[0]
    N = N1 + w2.shape[0]
    for n in prange(N):
        if n < N1:
            wr = w1[n]
            for t in range(T):
                out1[t, n] = rnd(_dot_w(x[t], wr), to_bf16)
        else:
            m = n - N1
            wr = w2[m]
            for t in range(T):
                v = rnd(_dot_w(x[t], wr), to_bf16)
                if with_ape:
                    v = np.float32(v + ape[slots[t], m])
                out2[t, m] = v


# --------------------------------------------------------------------------- scalar helpers
_ONE = np.float32(1.0)


@njit_kernel
def sumsq(buf):
    """``Σ buf[i]²`` in torch's CPU ``sum`` order (bitwise ``x.pow(2).sum(-1)``): the common
    kernel :func:`~llm_kernels.kernels.common.norm_rope.sumsq_torch_order` with its scratch."""
    return sumsq_torch_order(buf, np.empty((4, 32), np.float32))


@njit_kernel
def rms_factor(buf, eps):
    """``rsqrt(mean(buf²) + eps)`` as torch computes it (sum / D, then 1/sqrt)."""
    ms = np.float32(sumsq(buf) / np.float32(buf.size))
    return np.float32(_ONE / np.float32(np.sqrt(np.float32(ms + eps))))


@njit_kernel
def norm_weighted(buf, w, eps, to_bf16):
    """In place: ``rnd(w · (x · r))`` (reference ``rms_norm`` with a weight)."""
    r = rms_factor(buf, eps)
    for i in range(buf.size):
        buf[i] = rnd(np.float32(w[i] * np.float32(buf[i] * r)), to_bf16)


@njit_kernel
def norm_unweighted(buf, eps, to_bf16):
    """In place: ``rnd(x · rnd(r))`` (reference ``rms_norm`` with ``weight=None``)."""
    rr = rnd(rms_factor(buf, eps), to_bf16)
    for i in range(buf.size):
        buf[i] = rnd(np.float32(buf[i] * rr), to_bf16)


@njit_kernel
def rope(buf, c, s, to_bf16):
    """In place: interleaved RoPE on the trailing ``2·len(c)`` lanes, rounded (the
    reference ``apply_rope``: ``fl(fl(e·c) − fl(o·s))``, ``fl(fl(o·c) + fl(e·s))``). The
    leading "nope" lanes are left alone: callers pass rows already rounded to the output
    dtype (the reference's re-rounding of them is then a no-op)."""
    half = c.size
    nope = buf.size - 2 * half
    for i in range(half):
        e = buf[nope + 2 * i]
        o = buf[nope + 2 * i + 1]
        ci = c[i]
        si = s[i]
        buf[nope + 2 * i] = rnd(np.float32(np.float32(e * ci) - np.float32(o * si)), to_bf16)
        buf[nope + 2 * i + 1] = rnd(np.float32(np.float32(o * ci) + np.float32(e * si)), to_bf16)


@njit_kernel
def fwht(buf, scale):
    """In place: ``buf @ H_n`` · ``scale`` for the Sylvester Hadamard ``H_n`` (natural
    order butterflies, n = buf.size a power of two), O(n log n). With
    ``scale = fl(1/fl(sqrt n))`` this is the reference ``x @ hadamard(n)`` up to the
    summation order (a few fp32 ulps)."""
    n = buf.size
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a = buf[j]
                b = buf[j + h]
                buf[j] = np.float32(a + b)
                buf[j + h] = np.float32(a - b)
        h *= 2
    for i in range(n):
        buf[i] = np.float32(buf[i] * scale)


def hadamard_scale(n: int) -> np.float32:
    """The entry magnitude of the reference ``hadamard(n)``: ``fl32(1 / fl32(sqrt n))``."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return np.float32(np.float32(1.0) / np.float32(n ** 0.5))


@njit_kernel
def column_sums(p, out):
    """``out[j] = Σ_r p[r, j]`` in the order of torch's ``sum`` over a non-innermost dim
    (ATen ``SumKernel.cpp`` ``row_sum``: rows added sequentially in chunks of
    ``2^max(4, ceil_log2(n)/4)`` into a 4-level cascade; sequential for n <= 16)."""
    n, nk = p.shape
    lp = max(4, ceil_log2(n) // 4)
    step = 1 << lp
    lmask = step - 1
    acc = np.zeros((4, nk), np.float32)
    i = 0
    while i + step <= n:
        for _ in range(step):
            for j in range(nk):
                acc[0, j] += p[i, j]
            i += 1
        for lv in range(1, 4):
            for j in range(nk):
                acc[lv, j] += acc[lv - 1, j]
                acc[lv - 1, j] = np.float32(0.0)
            if (i & (lmask << (lv * lp))) != 0:
                break
    while i < n:
        for j in range(nk):
            acc[0, j] += p[i, j]
        i += 1
    for lv in range(1, 4):
        for j in range(nk):
            acc[0, j] += acc[lv, j]
    for j in range(nk):
        out[j] = acc[0, j]
