"""Fused hyper-connection kernels: ``hc_pre`` (RMS + mix GEMV + sigmoid + Sinkhorn +
collapse in one pass), ``hc_post`` (expand + stream mix) and ``hc_head``.

Same signatures and semantics as :mod:`llm_kernels.reference.deepseek_v4.hc` (spec §3);
inputs/outputs are float32 torch tensors (bf16-rounded values when ``dtype`` is bf16).
Each output element is owned by one loop iteration (no parallel float reductions), so
results are bitwise reproducible for any thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ..common.bf16 import round_f32 as _round
from ..common.jit import njit_kernel, sized
from ..common.norm_rope import NO_TABLE, NO_U16, NORM_ROPE_KERNEL
from .stage_shared import f32_np

__all__ = ["hc_pre", "hc_pre_norm", "hc_post", "hc_post_pre_norm", "hc_head"]


@njit_kernel(parallel=True, fastmath=True)
def _mix(xf, fn, eps, out):
    """out[t, m] = rsqrt(mean(xf[t]²) + eps) · (xf[t] · fn[m]); xf [T, K], fn [M, K].
    One parallel region for all tokens: the inverse RMS per token first, then one
    output row m per iteration (deterministic for any thread count)."""
    T, K = xf.shape
    M = fn.shape[0]
    r = np.empty(T, np.float32)
    for t in prange(T):
        ss = np.float32(0.0)
        row = xf[t]
        for k in range(K):
            ss += row[k] * row[k]
        r[t] = np.float32(1.0) / np.sqrt(ss / np.float32(K) + np.float32(eps))
    for m in prange(M):  # fn[m] read once for all tokens
        w = fn[m]
        for t in range(T):
            acc = np.float32(0.0)
            row = xf[t]
            for k in range(K):
                acc += row[k] * w[k]
            out[t, m] = acc * r[t]


@njit_kernel
def _weights(m, scale, base, hc, iters, hc_eps, pre, post, comb):
    """pre/post/comb of every token from its mix logits m [T, (2+hc)·hc] (spec §3.1)."""
    T = m.shape[0]
    for t in range(T):
        for h in range(hc):
            pre[t, h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-(m[t, h] * scale[0] + base[h]))) + hc_eps
            post[t, h] = np.float32(2.0) / (np.float32(1.0) + np.exp(-(m[t, hc + h] * scale[1] + base[hc + h])))
        c = comb[t]
        for i in range(hc):
            mx = np.float32(-np.inf)
            for j in range(hc):
                v = m[t, 2 * hc + i * hc + j] * scale[2] + base[2 * hc + i * hc + j]
                c[i, j] = v
                mx = max(mx, v)
            s = np.float32(0.0)
            for j in range(hc):
                c[i, j] = np.exp(c[i, j] - mx)
                s += c[i, j]
            for j in range(hc):
                c[i, j] = c[i, j] / s + hc_eps
        for it in range(iters):
            if it > 0:  # row normalisation (the first round starts with the columns)
                for i in range(hc):
                    s = np.float32(0.0)
                    for j in range(hc):
                        s += c[i, j]
                    for j in range(hc):
                        c[i, j] = c[i, j] / (s + hc_eps)
            for j in range(hc):
                s = np.float32(0.0)
                for i in range(hc):
                    s += c[i, j]
                for i in range(hc):
                    c[i, j] = c[i, j] / (s + hc_eps)


_BLOCK = 512  # columns per parallel iteration of the elementwise HC kernels


@njit_kernel(parallel=True)
def _collapse(x, pre, to_bf16, out):
    """out[t, d] = rnd(Σ_h pre[t,h] · x[t,h,d]) (summed in h order from 0). One iteration per
    (token, block of columns); the inner column loops (from 0: no index wraparound) vectorise."""
    T, HC, D = x.shape
    nb = (D + _BLOCK - 1) // _BLOCK
    for n in prange(T * nb):
        t, b = n // nb, n % nb
        d0, d1 = b * _BLOCK, min(D, (b + 1) * _BLOCK)
        o = out[t, d0:d1]
        w = d1 - d0
        for d in range(w):
            o[d] = np.float32(0.0)
        for h in range(HC):
            p = pre[t, h]
            xr = x[t, h, d0:d1]
            for d in range(w):
                o[d] += p * xr[d]
        for d in range(w):
            o[d] = _round(o[d], to_bf16)


@njit_kernel(parallel=True)
def _post(x, res, post, comb, to_bf16, out):
    """out[t,j,d] = rnd(rnd(rnd(post[t,j])·x[t,d]) + rnd(Σ_i rnd(comb[t,i,j])·res[t,i,d])),
    the sum in i order from 0. One iteration per (token, stream, block of columns); the
    inner column loops vectorise (out[t, j] holds the partial sums)."""
    T, HC, D = res.shape
    nb = (D + _BLOCK - 1) // _BLOCK
    for n in prange(T * HC * nb):
        t, j, b = n // (HC * nb), (n // nb) % HC, n % nb
        d0, d1 = b * _BLOCK, min(D, (b + 1) * _BLOCK)
        o = out[t, j, d0:d1]
        w = d1 - d0
        for d in range(w):
            o[d] = np.float32(0.0)
        for i in range(HC):
            c = _round(comb[t, i, j], to_bf16)
            r = res[t, i, d0:d1]
            for d in range(w):
                o[d] += c * r[d]
        p = _round(post[t, j], to_bf16)
        xr = x[t, d0:d1]
        for d in range(w):
            o[d] = _round(_round(p * xr[d], to_bf16) + _round(o[d], to_bf16), to_bf16)


@njit_kernel
def _pre_all(x, fn, eps, scale, base, hc, iters, hc_eps, to_bf16, m, pre, post, comb, out):
    """:func:`_mix`, :func:`_weights` and :func:`_collapse` of ``hc_pre`` in one dispatch
    (the same kernels in the same order: bitwise the three calls)."""
    T, HC, D = x.shape
    _mix(x.reshape(T, HC * D), fn, eps, m)
    _weights(m, scale, base, hc, iters, hc_eps, pre, post, comb)
    _collapse(x, pre, to_bf16, out)


@njit_kernel
def _pre_norm_all(x, fn, eps, scale, base, hc, iters, hc_eps, to_bf16, m, pre, post, comb, out, norm_w, no_table,
                  no_u16, xn):
    """:func:`_pre_all` then the RMSNorm of its output rows into ``xn`` (the kernel and
    arguments of :func:`..common.norm_rope.rms_norm_rows_f32`) in one dispatch."""
    _pre_all(x, fn, eps, scale, base, hc, iters, hc_eps, to_bf16, m, pre, post, comb, out)
    NORM_ROPE_KERNEL(out, norm_w, True, no_table, no_table, 1, eps, True, False, False, to_bf16, True, xn, no_u16)


@njit_kernel
def _post_pre_norm_all(x, res, post_in, comb_in, xhc, fn, eps, scale, base, hc, iters, hc_eps,
                       to_bf16, m, pre, post, comb, out, norm_w, no_table, no_u16, xn):
    """:func:`_post` into ``xhc`` then :func:`_pre_norm_all` of ``xhc`` in one dispatch (the
    same kernels in the same order: bitwise the two calls)."""
    _post(x, res, post_in, comb_in, to_bf16, xhc)
    _pre_norm_all(xhc, fn, eps, scale, base, hc, iters, hc_eps, to_bf16, m, pre, post, comb, out, norm_w, no_table,
                  no_u16, xn)


_np = f32_np  # float32 numpy view of a tensor (copy only when needed)


def hc_pre(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
           hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``hc_pre`` (spec §3.1): x_hc [T, HC, D] -> x_mixed [T, D], post [T, HC],
    comb [T, HC, HC], float32. Same contract as the reference."""
    args = (_np(x_hc), *_pre_args(x_hc.shape, hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps, rms_eps,
                                  dtype))
    sized(_pre_all, x_hc.shape[0] * hc_fn.numel())(*args)
    post, comb, out = args[-3:]
    return torch.from_numpy(out), torch.from_numpy(post), torch.from_numpy(comb)


def hc_pre_norm(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                norm_w: torch.Tensor, *, hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``hc_pre_norm`` (the reference's ``hc_pre`` then ``rms_norm(x_mixed, norm_w)``):
    x_hc [T, HC, D] -> normed rows [T, D], post [T, HC], comb [T, HC, HC], float32; bitwise
    :func:`hc_pre` then the fused ``rms_norm`` (one Numba dispatch instead of two wrapper
    calls). Raises ValueError for a ``norm_w`` that is not [D]."""
    T, HC, D = x_hc.shape
    if tuple(norm_w.shape) != (D,):
        raise ValueError(f"norm_w must be [D={D}], got {tuple(norm_w.shape)}")
    args = _pre_args(x_hc.shape, hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps, rms_eps, dtype)
    xn = np.empty((T, D), np.float32)
    sized(_pre_norm_all, T * hc_fn.numel())(_np(x_hc), *args, _np(norm_w), NO_TABLE, NO_U16, xn)
    post, comb = args[-3:-1]
    return torch.from_numpy(xn), torch.from_numpy(post), torch.from_numpy(comb)


def _pre_args(shape, hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps, rms_eps, dtype) -> tuple:
    """The arguments of :func:`_pre_all` after its input ``x`` [T, HC, D] (``shape``), with
    fresh output buffers; the last three are ``post`` [T, HC], ``comb`` [T, HC, HC] and
    ``x_mixed`` [T, D]."""
    T, HC, D = shape
    return (_np(hc_fn), np.float32(rms_eps), _np(hc_scale), _np(hc_base), hc_mult, sinkhorn_iters,
            np.float32(hc_eps), dtype == torch.bfloat16, np.empty((T, hc_fn.shape[0]), np.float32),
            np.empty((T, HC), np.float32), np.empty((T, HC), np.float32), np.empty((T, HC, HC), np.float32),
            np.empty((T, D), np.float32))


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Fused ``hc_post`` (spec §3.2): [T, D], [T, HC, D], [T, HC], [T, HC, HC] -> [T, HC, D]."""
    res = _np(residual)
    out = np.empty_like(res)
    sized(_post, res.size * (res.shape[1] + 1))(_np(x), res, _np(post), _np(comb), dtype == torch.bfloat16, out)
    return torch.from_numpy(out)


def hc_post_pre_norm(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                     hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_w: torch.Tensor, *,
                     hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_eps: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sublayer boundary (the reference's ``hc_post`` then ``hc_pre_norm``): x [T, D],
    residual [T, HC, D], post [T, HC], comb [T, HC, HC] of the sublayer that ends, the next
    sublayer's ``hc_fn`` / ``hc_scale`` / ``hc_base`` / ``norm_w`` -> new HC streams [T, HC, D],
    normed rows [T, D], post [T, HC], comb [T, HC, HC], float32; bitwise :func:`hc_post` then
    :func:`hc_pre_norm` (one Numba dispatch instead of two wrapper calls). Raises ValueError
    for a ``norm_w`` that is not [D]."""
    res = _np(residual)
    T, HC, D = res.shape
    if tuple(norm_w.shape) != (D,):
        raise ValueError(f"norm_w must be [D={D}], got {tuple(norm_w.shape)}")
    xhc = np.empty_like(res)
    args = _pre_args(res.shape, hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps, rms_eps, dtype)
    xn = np.empty((T, D), np.float32)
    work = max(res.size * (HC + 1), T * hc_fn.numel())
    sized(_post_pre_norm_all, work)(_np(x), res, _np(post), _np(comb), xhc, *args, _np(norm_w), NO_TABLE, NO_U16,
                                    xn)
    post2, comb2 = args[-3:-1]
    return torch.from_numpy(xhc), torch.from_numpy(xn), torch.from_numpy(post2), torch.from_numpy(comb2)


def hc_head(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
            hc_eps: float, rms_eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Fused ``hc_head`` (spec §3.3): x_hc [T, HC, D] -> [T, D]."""
    T, HC, D = x_hc.shape
    x = _np(x_hc)
    m = np.empty((T, HC), np.float32)
    sized(_mix, T * hc_fn.numel())(x.reshape(T, HC * D), _np(hc_fn), np.float32(rms_eps), m)
    s, b = _np(hc_scale).reshape(-1)[0], _np(hc_base)
    pre = (1.0 / (1.0 + np.exp(-(m * np.float32(s) + b)))).astype(np.float32) + np.float32(hc_eps)
    out = np.empty((T, D), np.float32)
    sized(_collapse, x.size)(x, pre, dtype == torch.bfloat16, out)
    return torch.from_numpy(out)


