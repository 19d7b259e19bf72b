"""Grouped low-rank output projection of DeepSeek-V4 attention (``grouped_output_proj``):
``o [T, H, HD] -> wo_a (per group) -> wo_b -> [T, D]``, the last part of
:func:`.sparse_attn.sparse_attn`. Same contract as the reference function (spec §9.3).

* **wo_a** (grouped low-rank projection, 64 MiB bf16 at Flash) as a Numba GEMV, each
  work item a few rows of one group for all tokens:

  * bf16 mode with AVX512_BF16: ``vdpbf16ps`` register tiles (llvmlite intrinsic
    :func:`common.x86.bf16_dot_tile`: 1x8, 2x4 or 4x4 tokens x rows, 16 fp32 lanes of exact bf16
    products per output, fixed lane-sum tree) on the natural ``[R, K]`` layout (no packed
    copy). [T=1 1.45 ms = 46 GB/s; T=8 2.0-2.2 ms; torch bmm 2.2 / 2.3-2.4 ms; the fp32
    FMA kernel below 1.65 / 2.6 ms]
  * otherwise (fp32 mode, odd K): 4 rows x 4 tokens fp32 FMA tiles, bf16 widened in
    registers.
  * ``T > WO_A_NUMBA_MAX_T``: torch's batched matmul (compute-bound; faster at T=12).

  Products of bf16 values are exact in fp32, so only the summation order differs from
  oneDNN; output rounded to ``dtype``.
* **wo_b**: W8A8 (``QuantWeight``): per-(token, group) INT8 quantisation of the OL rows
  (bit-exact golden recipe, :func:`common.quant.quant_row_f32`), one exact INT32 VNNI
  GEMM per group through :func:`common.gemm.w8a8_gemm_i32` on the group's pre-packed
  weight slice (prepared at load, see below), and a Numba epilogue
  ``out = Σ_g fl(acc_g·s_g)`` (fp32, group order, like the golden) ``-> rnd(out·s_w)``.
  [32 MiB int8: T=1 0.5-0.65 ms, T=8 0.8-0.9 ms] Float ``wo_b``: torch GEMM exactly as
  the reference.

Weights: ``wo_a`` is read in place (a zero-copy view of the bf16 / float32 tensor; a float32
``wo_a`` in bf16 mode is rounded to bf16 for the call, as the reference does). ``wo_b`` is
prepared at load (:func:`prepare_wo_b`: one packed INT8 weight per group, a
:class:`~llm_kernels.kernels.common.prepared.PackedColumnGroups`); an unprepared
``QuantWeight`` is sliced and packed for the call.

Determinism: every Numba ``prange`` iteration owns its outputs; float32 mode's float
``wo_b`` GEMM is MKL sgemm (see :mod:`.sparse_attn`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.quant import QuantWeight
from ..common import jit
from ..common.bf16 import load_f32, torch_bf16_as_u16
from ..common.bf16 import round_f32 as _rnd
from ..common.gemm import pack_w8a8, w8a8_gemm_i32, w8a8_linear
from ..common.gemm_group import group_gemm_linear, pack_group_w8
from ..common.gemm_multi import stack_packs
from ..common.gemm_pack import is_tiled
from ..common.jit import njit_kernel
from ..common.prepared import PackedColumnGroups, PackedGroupLinear, PackedGroupRowGroups, PackedRowGroups
from ..common.quant import quant_row_f32
from ..common.x86 import bf16_dot_tile
from .output_proj_int8 import fused_int8_output_proj, fused_wo_b, stacks_of

__all__ = ["USE_BF16_DOT", "WO_A_NUMBA_MAX_T", "grouped_output_proj", "prepare_wo_a", "prepare_wo_b"]

#: Largest token count for which wo_a runs as a Numba GEMV (above: torch's batched matmul,
#: which wins once the work is compute-bound: T=12 torch 2.6 ms vs 3.4-4.0 ms).
WO_A_NUMBA_MAX_T = 8
#: bf16 mode runs wo_a with ``vdpbf16ps`` register tiles (AVX512_BF16) when available.
USE_BF16_DOT = jit.USE_BF16

# fastmath for loops whose float reductions must vectorise (order then depends on the
# compiled code only, never on the thread count); no nnan/ninf so that -inf stays exact.
_FM = {"reassoc", "nsz", "contract", "arcp"}


# --------------------------------------------------------------------------- wo_a GEMV
@njit_kernel(fastmath=_FM)
def _dot4x4(w, r0, x, t0, g, K, out, to_bf16):
    """4 weight rows x 4 tokens: ``out[t0+a, r0+b] = rnd(Σ_k w[r0+b, k]·x[t0+a, g, k])``."""
    w0 = w[r0]
    w1 = w[r0 + 1]
    w2 = w[r0 + 2]
    w3 = w[r0 + 3]
    xa = x[t0, g]
    xb = x[t0 + 1, g]
    xc = x[t0 + 2, g]
    xd = x[t0 + 3, g]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)  # noqa: E702
    b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)  # noqa: E702
    c0 = np.float32(0.0); c1 = np.float32(0.0); c2 = np.float32(0.0); c3 = np.float32(0.0)  # noqa: E702
    d0 = np.float32(0.0); d1 = np.float32(0.0); d2 = np.float32(0.0); d3 = np.float32(0.0)  # noqa: E702
    for k in range(K):
        f0 = load_f32(w0[k])
        f1 = load_f32(w1[k])
        f2 = load_f32(w2[k])
        f3 = load_f32(w3[k])
        u = xa[k]
        a0 += f0 * u; a1 += f1 * u; a2 += f2 * u; a3 += f3 * u  # noqa: E702
        u = xb[k]
        b0 += f0 * u; b1 += f1 * u; b2 += f2 * u; b3 += f3 * u  # noqa: E702
        u = xc[k]
        c0 += f0 * u; c1 += f1 * u; c2 += f2 * u; c3 += f3 * u  # noqa: E702
        u = xd[k]
        d0 += f0 * u; d1 += f1 * u; d2 += f2 * u; d3 += f3 * u  # noqa: E702
    out[t0, r0] = _rnd(a0, to_bf16); out[t0, r0 + 1] = _rnd(a1, to_bf16)  # noqa: E702
    out[t0, r0 + 2] = _rnd(a2, to_bf16); out[t0, r0 + 3] = _rnd(a3, to_bf16)  # noqa: E702
    out[t0 + 1, r0] = _rnd(b0, to_bf16); out[t0 + 1, r0 + 1] = _rnd(b1, to_bf16)  # noqa: E702
    out[t0 + 1, r0 + 2] = _rnd(b2, to_bf16); out[t0 + 1, r0 + 3] = _rnd(b3, to_bf16)  # noqa: E702
    out[t0 + 2, r0] = _rnd(c0, to_bf16); out[t0 + 2, r0 + 1] = _rnd(c1, to_bf16)  # noqa: E702
    out[t0 + 2, r0 + 2] = _rnd(c2, to_bf16); out[t0 + 2, r0 + 3] = _rnd(c3, to_bf16)  # noqa: E702
    out[t0 + 3, r0] = _rnd(d0, to_bf16); out[t0 + 3, r0 + 1] = _rnd(d1, to_bf16)  # noqa: E702
    out[t0 + 3, r0 + 2] = _rnd(d2, to_bf16); out[t0 + 3, r0 + 3] = _rnd(d3, to_bf16)  # noqa: E702


@njit_kernel(fastmath=_FM)
def _dot4x1(w, r0, x, t, g, K, out, to_bf16):
    """4 weight rows x 1 token."""
    w0 = w[r0]
    w1 = w[r0 + 1]
    w2 = w[r0 + 2]
    w3 = w[r0 + 3]
    xa = x[t, g]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)  # noqa: E702
    for k in range(K):
        u = xa[k]
        a0 += load_f32(w0[k]) * u
        a1 += load_f32(w1[k]) * u
        a2 += load_f32(w2[k]) * u
        a3 += load_f32(w3[k]) * u
    out[t, r0] = _rnd(a0, to_bf16); out[t, r0 + 1] = _rnd(a1, to_bf16)  # noqa: E702
    out[t, r0 + 2] = _rnd(a2, to_bf16); out[t, r0 + 3] = _rnd(a3, to_bf16)  # noqa: E702


@njit_kernel(fastmath=_FM)
def _dot1x1(w, r, x, t, g, K, out, to_bf16):
    wr = w[r]
    xa = x[t, g]
    a = np.float32(0.0)
    for k in range(K):
        a += load_f32(wr[k]) * xa[k]
    out[t, r] = _rnd(a, to_bf16)


@njit_kernel(parallel=True)
def _grouped_gemv(w, x, OL, to_bf16, out):
    """``out[t, g·OL + o] = rnd(Σ_k w[g·OL + o, k]·x[t, g, k])`` for w ``[G·OL, K]`` (bf16 bits
    or float32) and x ``[T, G, K]`` float32. Work items: blocks of 4 rows inside one group
    (a group's tail rows singly); each item owns its output columns for all tokens."""
    R, K = w.shape
    T, G, _ = x.shape
    nq = (OL + 3) // 4
    for b in prange(G * nq):
        g = b // nq
        r0 = g * OL + (b - g * nq) * 4
        nr = min(4, (g + 1) * OL - r0)
        if nr == 4:
            t = 0
            while t + 4 <= T:
                _dot4x4(w, r0, x, t, g, K, out, to_bf16)
                t += 4
            while t < T:
                _dot4x1(w, r0, x, t, g, K, out, to_bf16)
                t += 1
        else:
            for r in range(r0, r0 + nr):
                for t in range(T):
                    _dot1x1(w, r, x, t, g, K, out, to_bf16)


# --------------------------------------------------------------------------- wo_a with vdpbf16ps
#: token-tile heights of the vdpbf16ps wo_a kernel and the weight rows per tile (measured
#: at Flash dims, 64 MiB bf16 wo_a: 1x8 1.45 ms at T=1; for T=8 two 4x4 passes 2.0 ms vs
#: one 8x2 pass 2.1-2.7 ms, torch bf16 bmm 2.3 ms; T=12: torch 2.6 ms beats every tiling)
_BF_TILES = {1: 8, 2: 4, 4: 4}
_BT1, _BT2, _BT4 = (bf16_dot_tile(t, r) for t, r in _BF_TILES.items())


@njit_kernel
def _bf_tile(tp, nr, x, x_off, x_ts, w, w_off, K, nk, out):
    if tp == 1:
        _BT1(x, x_off, x_ts, w, w_off, K, nk, out, 0)
    elif tp == 2:
        _BT2(x, x_off, x_ts, w, w_off, K, nk, out, 0)
    else:
        _BT4(x, x_off, x_ts, w, w_off, K, nk, out, 0)


@njit_kernel(parallel=True)
def _grouped_gemv_bf16(w, xb, T, tp, nr, OL, to_bf16, out):
    """``out[t, g·OL + o] = rnd(Σ_k w[g·OL + o, k]·x[t, g, k])`` with the vdpbf16ps tiles:
    w ``[R, K]`` bf16 bits, xb ``[TP, G, K]`` bf16 bits (rows >= T zero), token tiles of
    ``tp`` rows, ``nr`` weight rows per work item (``OL % nr == 0``, ``K % 32 == 0``). Each
    item owns its rows' outputs for every token."""
    R, K = w.shape
    TP, G, _ = xb.shape
    wf = w.reshape(-1)
    xf = xb.reshape(-1)
    nk = K // 32
    for b in prange(R // nr):
        r0 = b * nr
        g = r0 // OL
        scratch = np.empty(tp * nr, np.float32)
        for t0 in range(0, TP, tp):
            _bf_tile(tp, nr, xf, (t0 * G + g) * K, G * K, wf, r0 * K, K, nk, scratch)
            for t in range(t0, min(t0 + tp, T)):
                for r in range(nr):
                    out[t, r0 + r] = _rnd(scratch[(t - t0) * nr + r], to_bf16)


def _bf16_tile_shape(T: int) -> tuple[int, int, int]:
    """(token tile height, weight rows per item, padded token count) for ``T`` tokens."""
    tp = 1 if T <= 1 else 2 if T <= 2 else 4
    return tp, _BF_TILES[tp], -(-T // tp) * tp


# --------------------------------------------------------------------------- wo_b (W8A8)
@njit_kernel(parallel=True)
def _quant_groups(r, G, q, s):
    """Per-(token, group) INT8 quantisation of ``r`` [T, G·OL] into ``q`` [G, T, OL] and
    ``s`` [T, G] (bit-exact golden ``quant_per_row``)."""
    T = r.shape[0]
    OL = q.shape[2]
    for i in prange(T * G):
        t = i // G
        g = i - t * G
        s[t, g] = quant_row_f32(r[t, g * OL:(g + 1) * OL], q[g, t])


@njit_kernel(parallel=True)
def _combine_groups(acc, s, sw, to_bf16, out):
    """``out[t, n] = rnd(fl(Σ_g fl(acc[g, t, n]·s[t, g]))·sw[n])``, groups summed in order
    from 0.0 exactly like the golden's ``out += acc.float() * s[:, g]``."""
    G, T, N = acc.shape
    NB = 256
    nb = (N + NB - 1) // NB
    for i in prange(T * nb):
        t = i // nb
        n0 = (i - t * nb) * NB
        n1 = min(N, n0 + NB)
        m = n1 - n0
        o = out[t, n0:n1]  # the partial sums; loops from 0 (no index wraparound) vectorise
        for n in range(m):
            o[n] = np.float32(0.0)
        for g in range(G):
            sg = s[t, g]
            a = acc[g, t, n0:n1]
            for n in range(m):
                o[n] = np.float32(o[n] + np.float32(np.float32(a[n]) * sg))
        swr = sw[n0:n1]
        for n in range(m):
            o[n] = _rnd(np.float32(o[n] * swr[n]), to_bf16)


# --------------------------------------------------------------------------- prepared wo_b
def prepare_wo_b(wo_b: QuantWeight, o_groups: int) -> PackedColumnGroups:
    """Load-time form of a W8A8 ``wo_b`` ``[D, G·OL]``: the ``G`` column slices ``[D, OL]``,
    each packed for the active kernel family (the raw int8 tensor is not referenced)."""
    if isinstance(wo_b, PackedColumnGroups) and len(wo_b.packs) == o_groups:
        return wo_b
    D, GOL = wo_b.shape
    if GOL % o_groups:
        raise ValueError(f"wo_b in-dim {GOL} is not divisible by o_groups={o_groups}")
    ol = GOL // o_groups
    qw = wo_b.qweight
    sc = wo_b.scale.float().contiguous()
    return _with_stack(PackedColumnGroups([pack_w8a8(qw[:, g * ol:(g + 1) * ol].contiguous(), sc)
                                           for g in range(o_groups)], wo_b.scale))


def _with_stack(pw):
    """``pw`` with ``stack``: its tiled group packs stacked for the one-region decode path
    (:mod:`.output_proj_int8`), or None for the plain ``"nk"`` layout."""
    object.__setattr__(pw, "stack", stack_packs(pw.packs) if is_tiled(pw.packs[0].layout) else None)
    return pw


def prepare_wo_a(wo_a: QuantWeight | GroupQuantWeight, o_groups: int) -> PackedRowGroups | PackedGroupRowGroups:
    """Load-time form of an INT8 ``wo_a`` ``[G·OL, K]`` (the ``int8`` / ``int8_g32``
    schemes): the ``G`` row slices ``[OL, K]``, each packed for the active kernel family
    with its rows' scales."""
    if isinstance(wo_a, (PackedRowGroups, PackedGroupRowGroups)) and len(wo_a.packs) == o_groups:
        return wo_a
    R = wo_a.shape[0]
    if R % o_groups:
        raise ValueError(f"wo_a out-dim {R} is not divisible by o_groups={o_groups}")
    ol = R // o_groups
    if isinstance(wo_a, GroupQuantWeight):
        qw, sc, gs = wo_a.qweight, wo_a.scale, wo_a.group_size
        return PackedGroupRowGroups([pack_group_w8(GroupQuantWeight(qw[g * ol:(g + 1) * ol].contiguous(),
                                                                    sc[g * ol:(g + 1) * ol].contiguous(), gs))
                                     for g in range(o_groups)], wo_a.scale)
    qw, sc = wo_a.qweight, wo_a.scale.float().contiguous()
    return _with_stack(PackedRowGroups([pack_w8a8(qw[g * ol:(g + 1) * ol].contiguous(),
                                                  sc[g * ol:(g + 1) * ol].contiguous())
                                        for g in range(o_groups)], wo_a.scale))


def _wo_a_int8(x: np.ndarray, wo_a: QuantWeight | GroupQuantWeight, o_groups: int, to_bf16: bool) -> np.ndarray:
    """INT8 wo_a: per group one fused W8A8 linear of the (token, group) rows (per-row INT8
    quantisation of each row, exact INT32 GEMM, golden dequant), rounded to the dtype;
    bitwise equal to the reference's per-group ``rnd(w8a8_linear(o_g, wo_a_g))``."""
    packs = prepare_wo_a(wo_a, o_groups).packs
    T = x.shape[0]
    ol = packs[0].n
    out = np.empty((T, o_groups * ol), np.float32)
    lin = group_gemm_linear if isinstance(wo_a, GroupQuantWeight) else w8a8_linear
    for g in range(o_groups):
        y = lin(np.ascontiguousarray(x[:, g]), packs[g])
        if to_bf16:
            y = torch.from_numpy(y).to(torch.bfloat16).float().numpy()
        out[:, g * ol:(g + 1) * ol] = y
    return out


def _wo_a_array(wo_a: torch.Tensor, to_bf16: bool) -> np.ndarray:
    """wo_a as a C-contiguous numpy array the GEMV reads: bf16 bits (uint16) for a bf16
    tensor, float32 for a float32 one in float32 mode; a float32 weight in bf16 mode is
    rounded to bf16 (the reference casts it on every call too)."""
    w = wo_a.detach()
    if w.dtype == torch.bfloat16:
        return torch_bf16_as_u16(w.contiguous())
    if not to_bf16:
        return w.float().contiguous().numpy()
    return torch_bf16_as_u16(w.to(torch.bfloat16).contiguous())


def _np_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


# --------------------------------------------------------------------------- output projection
def _wo_b_project(r: np.ndarray, wo_b, o_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, G·OL] float32 (dtype-rounded) -> [T, D] through wo_b (W8A8 or float)."""
    to_bf16 = dtype == torch.bfloat16
    T = r.shape[0]
    if isinstance(wo_b, GroupQuantWeight):  # blocks of G inputs never straddle two groups
        y = group_gemm_linear(r, PackedGroupLinear.of(wo_b).packed)
        return torch.from_numpy(y).to(torch.bfloat16).float() if to_bf16 else torch.from_numpy(y)
    if isinstance(wo_b, QuantWeight):
        if getattr(wo_b, "stack", None) is not None:  # prepared: one parallel region for every group
            y = fused_wo_b(r, wo_b.stack, to_bf16)
            if y is not None:
                return y
        packs = prepare_wo_b(wo_b, o_groups).packs
        D = wo_b.shape[0]
        ol = r.shape[1] // o_groups
        q = np.empty((o_groups, T, ol), np.int8)
        s = np.empty((T, o_groups), np.float32)
        out = np.empty((T, D), np.float32)
        if T == 0:
            return torch.from_numpy(out)
        _quant_groups(r, o_groups, q, s)
        acc = np.empty((o_groups, T, D), np.int32)
        for g in range(o_groups):
            acc[g] = w8a8_gemm_i32(q[g], packs[g])
        _combine_groups(acc, s, wo_b.scale.float().contiguous().numpy(), to_bf16, out)
        return torch.from_numpy(out)
    rt = torch.from_numpy(r)
    if dtype == torch.float32:
        return torch.matmul(rt, wo_b.float().T)
    return torch.matmul(rt.to(dtype), wo_b.to(dtype).T).float()


def _wo_a_project(x: np.ndarray, wo_a: torch.Tensor, o_groups: int, dtype: torch.dtype) -> np.ndarray:
    """x [T, G, K] float32 (dtype-rounded) -> r [T, G·OL] float32 rounded to dtype."""
    to_bf16 = dtype == torch.bfloat16
    T, G, K = x.shape
    R = wo_a.shape[0]
    if wo_a.shape[1] != K or R % G:
        raise ValueError(f"wo_a {tuple(wo_a.shape)} does not match {G} groups of {K} inputs")
    ol = R // G
    if isinstance(wo_a, (QuantWeight, GroupQuantWeight)):
        return _wo_a_int8(x, wo_a, G, to_bf16)
    if T > WO_A_NUMBA_MAX_T:  # compute-bound: torch's bf16/fp32 batched matmul is faster
        wa = wo_a.detach().view(G, ol, K)
        xt = torch.from_numpy(x).transpose(0, 1)
        if to_bf16:
            r = torch.matmul(xt.to(torch.bfloat16), wa.to(torch.bfloat16).transpose(1, 2)).float()
        else:
            r = torch.matmul(xt, wa.float().transpose(1, 2))
        return r.transpose(0, 1).reshape(T, R).contiguous().numpy()
    out = np.empty((T, R), np.float32)
    if not (T and R):
        return out
    w = _wo_a_array(wo_a, to_bf16)
    if USE_BF16_DOT and to_bf16 and w.dtype == np.uint16 and K % 32 == 0 and K:
        tp, nr, TP = _bf16_tile_shape(T)
        if ol % nr == 0:
            xb = torch.zeros(TP, G, K, dtype=torch.bfloat16)
            xb[:T] = torch.from_numpy(x)            # exact: x holds bf16 values
            _grouped_gemv_bf16(w, torch_bf16_as_u16(xb), T, tp, nr, ol, True, out)
            return out
    _grouped_gemv(w, x, ol, to_bf16, out)
    return out


def grouped_output_proj(o: torch.Tensor, wo_a: torch.Tensor, wo_b, *, o_groups: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Grouped low-rank output projection (same contract as the reference function):
    o [T, H, HD] (dtype-rounded) -> [T, D] float32 holding dtype values."""
    T = o.shape[0]
    x = _np_f32(o).reshape(T, o_groups, o.shape[1] * o.shape[2] // o_groups)
    st = stacks_of(wo_a, wo_b)
    if st is not None:  # prepared INT8 wo_a and wo_b: one parallel region per weight
        y = fused_int8_output_proj(x, *st, dtype == torch.bfloat16)
        if y is not None:
            return y
    r = _wo_a_project(x, wo_a, o_groups, dtype)
    return _wo_b_project(r, wo_b, o_groups, dtype)
