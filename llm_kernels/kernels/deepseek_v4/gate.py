"""Fused router stage ``gate`` (score routing incl. bias, or hash routing by token id).

Same signature, arguments and return types as ``gate`` in
:mod:`llm_kernels.reference.deepseek_v4.moe` (spec §10): float32 weights and int64 expert
ids, the reference's rounding points.

``gate``
    Router logits: torch ``F.linear`` exactly as the reference (bit-identical logits; a
    [E=256, D=4096] GEMV is one oneDNN call of ~2-4 MiB). Everything after it is one Numba
    kernel (a row per token): score function in the storage dtype (each op rounded like
    torch's bf16 ops), selection ``top-k(score + bias)`` (stable: ties -> lower expert id)
    or the hash table, gather, normalisation (``w / (Σw + 1e-20)``), scaling. ``sigmoid``
    uses torch's exact formula ``1/(1+exp(-x))`` with a SLEEF-identical ``exp``;
    ``sqrtsoftplus`` uses ``log1p(exp(x))`` in float64 (torch's SLEEF ``log1pf`` differs in
    ~5 % of fp32 results by one ulp, i.e. rarely a bf16 ulp); ``softmax`` mirrors torch's
    AVX-512 reduction order. The indices come out sorted by descending score (torch's
    ``sorted=False`` order is unspecified; the ``moe`` result is independent of it up to
    the fp32 order of the K-term sum).

Measured (Flash dims, bf16, 2-core Zen 4 VM): ``gate`` E=256 0.073 / 0.123 ms (T=1 / 8) vs
the reference's 0.080 / 0.125 ms: both are dominated by the router-logit GEMV, which stays
torch (bit-identical logits, so the selection cannot differ from the reference's by a
rounding flip). Determinism: the kernel owns one row per ``prange`` iteration.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from ...numerics.linear import linear as _ref_linear
from ..common.bf16 import load_f32
from ..common.bf16 import round_f32 as _rnd
from ..common.jit import njit_kernel, sized
from ..common.vecmath import sleef_expf as _sleef_expf
from ..common.vecmath import tree16 as _tree16
from .stage_shared import ROW_INVARIANT_ROWS, f32_np

__all__ = ["gate", "router_logits"]

_SCORE_IDS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
_NO_TABLE = np.zeros((1, 1), np.int64)  # the kernel's hash-table arguments when routing by score
_NO_IDS = np.zeros(1, np.int64)


@njit_kernel
def _softplus(x):
    """``log1p(exp(x))`` (torch threshold 20: x itself above), float64 inside, rounded once."""
    if x > np.float32(20.0):
        return np.float32(x)
    return np.float32(np.log1p(np.exp(np.float64(x))))


# --------------------------------------------------------------------------- gate kernel
@njit_kernel(parallel=True)
def _gate_kernel(logits, score_id, bias, has_bias, tid2eid, ids, use_hash, k, norm, factor, to_bf16,
                 w_out, i_out, bad):
    """Per token row: scores (in the storage dtype), selection, gather, normalisation.
    Hash routing reads ``tid2eid[ids[t]]``; a row whose id is outside ``tid2eid`` gets
    ``bad[t] = 1``, one whose table row holds an expert outside [0, E) ``bad[t] = 2``.
    Returns the number of such rows (the caller raises)."""
    T, E = logits.shape
    nbad = 0
    for t in prange(T):
        bad[t] = 0
        if use_hash:
            tid = ids[t]
            if tid < 0 or tid >= tid2eid.shape[0]:
                bad[t] = 1
                nbad += 1
                continue
            for j in range(k):
                e = tid2eid[tid, j]
                if e < 0 or e >= E:
                    bad[t] = 2
            if bad[t]:
                nbad += 1
                continue
        lr = logits[t]
        sc = np.empty(E, np.float32)
        if score_id == 0:      # sqrt(softplus(l)), each op rounded
            for e in range(E):
                sp = _rnd(_softplus(load_f32(lr[e])), to_bf16)
                sc[e] = _rnd(np.float32(np.sqrt(sp)), to_bf16)
        elif score_id == 1:    # sigmoid: 1 / (1 + exp(-x))
            for e in range(E):
                v = load_f32(lr[e])
                sc[e] = _rnd(np.float32(np.float32(1.0) / np.float32(np.float32(1.0) + _sleef_expf(-v))),
                             to_bf16)
        else:                  # softmax over E in torch's reduction order
            m = np.float32(-np.inf)
            for e in range(E):
                m = max(m, load_f32(lr[e]))
            for e in range(E):
                sc[e] = _sleef_expf(np.float32(load_f32(lr[e]) - m))
            if E < 16:
                tot = np.float32(0.0)
                for e in range(E):
                    tot = np.float32(tot + sc[e])
            else:
                lanes = np.zeros(16, np.float32)
                for e in range(E):
                    lanes[e & 15] = np.float32(lanes[e & 15] + sc[e])
                tot = _tree16(lanes)
            inv = np.float32(np.float32(1.0) / tot)
            for e in range(E):
                sc[e] = _rnd(np.float32(sc[e] * inv), to_bf16)
        sel = i_out[t]
        if use_hash:
            for j in range(k):
                sel[j] = tid2eid[ids[t], j]
        else:
            # top-k of score + bias (fp32), descending, ties -> lower id, NaN never chosen
            key = np.empty(E, np.float32)
            for e in range(E):
                key[e] = np.float32(sc[e] + bias[e]) if has_bias else sc[e]
            kk = min(k, E)
            best = np.empty(kk, np.float32)
            n = 0
            for e in range(E):
                v = key[e]
                if not (v == v):
                    continue
                if n < kk:
                    p = n
                    n += 1
                elif v > best[kk - 1]:
                    p = kk - 1
                else:
                    continue
                while p > 0 and v > best[p - 1]:
                    best[p] = best[p - 1]
                    sel[p] = sel[p - 1]
                    p -= 1
                best[p] = v
                sel[p] = e
            for j in range(n, k):
                sel[j] = -1
        wr = w_out[t]
        for j in range(k):
            e = sel[j]
            wr[j] = sc[e] if 0 <= e < E else np.float32(0.0)
        if norm:
            s = np.float32(0.0)
            for j in range(k):
                s = np.float32(s + wr[j])
            s = _rnd(s, to_bf16)
            den = _rnd(np.float32(s + np.float32(1e-20)), to_bf16)
            for j in range(k):
                wr[j] = _rnd(np.float32(wr[j] / den), to_bf16)
        for j in range(k):
            wr[j] = _rnd(np.float32(wr[j] * factor), to_bf16)
    return nbad


def router_logits(x: torch.Tensor, gate_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The router's float logits ``x @ gate_wᵀ`` [T, E] as the reference computes them
    (torch's GEMM in ``dtype``). A decode-sized step (T <= :data:`ROW_INVARIANT_ROWS`) runs
    one 1-row GEMM per row: torch's bf16/fp32 GEMM rounds a row differently depending on
    how many rows share the call, and a router flip changes the experts; per row, a token's
    routing is the same in a 1-row step and in a verify step of speculative decoding (and
    bitwise the reference's at T = 1). Larger steps (prefill) run one GEMM, as the reference."""
    T = x.shape[0]
    if not isinstance(gate_w, torch.Tensor):  # a quantized router weight (no scheme makes one today)
        if 1 < T <= ROW_INVARIANT_ROWS:
            return torch.cat([_ref_linear(x[t:t + 1], gate_w, dtype) for t in range(T)], dim=0)
        return _ref_linear(x, gate_w, dtype)
    # the reference's float ``linear`` (``F.linear(x.to(dtype), w.to(dtype)).float()``) with the
    # conversions done once for all rows (element-wise: the same values), the GEMM per row
    xd, wd = x.to(dtype), gate_w.to(dtype)
    if 1 < T <= ROW_INVARIANT_ROWS:
        out = torch.empty((T, wd.shape[0]), dtype=dtype)
        for t in range(T):
            out[t:t + 1] = F.linear(xd[t:t + 1], wd)
        return out.float()
    return F.linear(xd, wd).float()


def gate(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
         input_ids: torch.Tensor, *, top_k: int, scoring_func: str, norm_topk_prob: bool,
         routed_scaling_factor: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts (same contract as the reference ``gate``):
    returns weights [T, K] float32 and indices [T, K] int64 (descending score order)."""
    if scoring_func not in _SCORE_IDS:
        raise ValueError(f"scoring_func must be sqrtsoftplus, sigmoid or softmax, got {scoring_func!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    to_bf16 = dtype == torch.bfloat16
    logits = router_logits(x, gate_w, dtype)
    T, E = logits.shape
    lg = logits.contiguous().numpy()
    use_hash = tid2eid is not None
    if use_hash:
        if tid2eid.dim() != 2 or tid2eid.shape[1] != top_k or tid2eid.dtype.is_floating_point:
            raise ValueError(f"tid2eid must be an integer table [vocab, top_k={top_k}], got "
                             f"{tuple(tid2eid.shape)} {tid2eid.dtype}")
        table = (tid2eid if tid2eid.is_contiguous() else tid2eid.contiguous()).numpy()  # integer: no grad
        ids = input_ids.detach()
        ids = (ids if ids.dtype == torch.int64 and ids.dim() == 1 and ids.is_contiguous()
               else ids.reshape(-1).to(torch.int64).contiguous()).numpy()
        if ids.shape[0] != T:
            raise ValueError(f"input_ids must hold one id per row of x ({T}), got {ids.shape[0]}")
    else:
        table, ids = _NO_TABLE, _NO_IDS
    b = (f32_np(bias) if bias is not None and not use_hash
         else np.zeros(1, np.float32))
    w_out = np.empty((T, top_k), np.float32)
    i_out = np.empty((T, top_k), np.int64)
    if T and top_k:
        bad = np.empty(T, np.int64)
        kernel = sized(_gate_kernel, T * E)
        if kernel(lg, _SCORE_IDS[scoring_func], b, bias is not None and not use_hash, table, ids, use_hash,
                  int(top_k), bool(norm_topk_prob), np.float32(routed_scaling_factor), to_bf16, w_out, i_out, bad):
            t = int(np.flatnonzero(bad)[0])
            if bad[t] == 1:
                raise IndexError(f"input_ids[{t}] = {int(ids[t])} is outside the tid2eid table [0, {table.shape[0]})")
            raise IndexError(f"tid2eid holds an expert id outside [0, {E}) (row of token id {int(ids[t])})")
    return torch.from_numpy(w_out), torch.from_numpy(i_out)
