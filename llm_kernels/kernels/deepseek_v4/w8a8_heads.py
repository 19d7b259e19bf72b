"""W8A8 drivers shared by the fused ``qkv_proj_rope`` and ``indexer`` kernels: the
per-head packed weight (prepared at load, or packed for one call), activation
quantisation into the packed VNNI layout, column-range INT32 accumulation on
``kernels/common``'s INT8 register tile (``x86_avx2.int8_bcast_tile``: VNNI or AVX2,
the process's ``jit.INT8_TILE``; plus a plain fallback), and the per-head
dequant + norm + RoPE (+ Hadamard + INT8) epilogues run one head per ``prange`` iteration.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ...numerics.quant import QuantWeight
from ..common import jit
from ..common.gemm import PackedW8A8, dot_i8, pack_w8a8, pad_to_tile
from ..common.gemm_pack import ACT_OFFSET, is_tiled
from ..common.jit import njit_kernel, sized
from ..common.prepared import PackedLinear
from ..common.quant import quant_row_f32
from ..common.x86_avx2 import int8_bcast_tile
from .stage_shared import fwht, norm_unweighted, rnd, rope


# --------------------------------------------------------------------------- packed weight
def heads_layout(head_dim: int) -> str:
    """Packed layout of a per-head W8A8 weight: the process's tile layout (``"vnni"`` or
    ``"avx2"``, :data:`jit.INT8_TILE`) when the register-tile kernels are active and a head
    is whole 16-column blocks, else the plain ``"nk"``."""
    return jit.INT8_TILE if jit.USE_INT8_TILES and head_dim % 16 == 0 else "nk"


def prepare_heads(w: QuantWeight, head_dim: int) -> PackedLinear:
    """Load-time form of a per-head W8A8 weight (``wq_b``, indexer ``wq_b``)."""
    if isinstance(w, PackedLinear) and w.packed.layout == heads_layout(head_dim):
        return w
    return PackedLinear(pack_w8a8(w.qweight, w.scale.float(), heads_layout(head_dim)), w.scale)


def heads_weight(w: QuantWeight, head_dim: int) -> PackedW8A8:
    """The packed weight the per-head kernels read: the prepared one, or (an unprepared
    ``QuantWeight``) packed now for this call."""
    return prepare_heads(w, head_dim).packed


# --------------------------------------------------------------------------- W8A8 pieces
#: Register-tile heights (tokens) of the per-head VNNI GEMM; one 16-column weight block per
#: tile, so a head's packed weights ([HD/16][Kp/4][16][4], contiguous) stream sequentially.
#: (The full-width GEMM of ``common.gemm`` uses other heights: 4 blocks of 16 per tile.)
HEAD_TILE_HEIGHTS = (1, 2, 4, 8, 16)
_PREFETCH = {1: 0, 2: 0, 4: 1024, 8: 2048, 16: 4096}
(_V1, _V2, _V4, _V8, _V16) = [int8_bcast_tile(tt, 1, _PREFETCH[tt]) for tt in HEAD_TILE_HEIGHTS]


def padded_rows(T: int) -> int:
    """Rows of the packed activation buffer: tiles of 16 tokens plus one remainder tile
    padded to the next entry of :data:`HEAD_TILE_HEIGHTS`."""
    return pad_to_tile(T, HEAD_TILE_HEIGHTS)


@njit_kernel
def head_tile(tt, xp, x_off, xks, wp, w_off, nkg, acc, a_off, ats):
    """One ``tt x 16`` register tile (``tt`` in :data:`HEAD_TILE_HEIGHTS`)."""
    if tt == 1:
        _V1(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 2:
        _V2(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 4:
        _V4(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    elif tt == 8:
        _V8(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)
    else:
        _V16(xp, x_off, xks, wp, w_off, 0, nkg, acc, a_off, ats, False)


@njit_kernel
def acc_cols_vnni(xp, TP, KG, wp, b0, nblk, acc):
    """Register-tile int32 accumulators (zero point not yet removed: ``wsum128``) of the ``16·nblk`` output
    columns starting at block ``b0`` for all ``TP`` packed token rows:
    ``acc[t·ncols + c]``. Token tiles run inside the block loop, so a block's weights
    (16·Kp bytes) are reused from L1 by every tile."""
    ncols = nblk * 16
    wbs = KG * 64
    xks = TP * 4
    for j in range(nblk):
        w_off = (b0 + j) * wbs
        t0 = 0
        while t0 < TP:
            tt = min(16, TP - t0)
            head_tile(tt, xp, t0 * 4, xks, wp, w_off, KG, acc, t0 * ncols + j * 16, ncols)
            t0 += tt


@njit_kernel
def acc_cols_plain(xq, T, wq, n0, ncols, acc):
    """Exact int32 ``acc[t·ncols + c] = xq[t] · wq[n0 + c]`` (fallback, no intrinsics)."""
    for c in range(ncols):
        wr = wq[n0 + c]
        for t in range(T):
            acc[t * ncols + c] = dot_i8(xq[t], wr)


@njit_kernel
def pack_row(q, xp, t, TP, KG):
    """Scatter int8 row ``q`` into the ``[KG][TP][4]`` layout of this process's INT8 tile
    (byte ``q + ACT_OFFSET``: u8 ``q + 128`` for VNNI, the signed ``q`` for AVX2)."""
    K = q.size
    xks = TP * 4
    for k in range(K):
        xp[(k >> 2) * xks + t * 4 + (k & 3)] = np.uint8((np.int32(q[k]) + ACT_OFFSET) & 255)
    for k in range(K, KG * 4):
        xp[(k >> 2) * xks + t * 4 + (k & 3)] = np.uint8(ACT_OFFSET)


@njit_kernel
def pack_pad(xp, T, TP, KG):
    """Token rows ``T..TP-1`` of the packed layout = q = 0 (byte ``ACT_OFFSET``)."""
    xks = TP * 4
    for kg in range(KG):
        for i in range(T * 4, TP * 4):
            xp[kg * xks + i] = np.uint8(ACT_OFFSET)


@njit_kernel
def quant_into(buf, qmode, t, TP, KG, xp, xq, sx):
    """Quantise float32 row ``buf`` of token ``t`` (bit-exact golden ``quant_per_row``):
    ``qmode`` 1 -> packed VNNI row in ``xp``, 2 -> ``xq[t]``; scale -> ``sx[t]``."""
    if qmode == 1:
        q = np.empty(buf.size, np.int8)
        sx[t] = quant_row_f32(buf, q)
        pack_row(q, xp, t, TP, KG)
    elif qmode == 2:
        sx[t] = quant_row_f32(buf, xq[t])


@njit_kernel
def quant_act(x, qmode, TP, KG, xp, xq, sx):
    """Per-token INT8 quantisation of float32 ``x`` [T, K] into the layout of ``qmode``."""
    T, K = x.shape
    for t in range(T):
        buf = np.empty(K, np.float32)
        for i in range(K):
            buf[i] = x[t, i]
        quant_into(buf, qmode, t, TP, KG, xp, xq, sx)
    if qmode == 1:
        pack_pad(xp, T, TP, KG)


# --------------------------------------------------------------------------- head epilogues
#: rnd(dtype) -> unweighted RMSNorm -> RoPE                   (qkv: q heads)
MODE_QNORM_ROPE = 1
#: rnd(dtype) -> RoPE (rounded to dtype)                      (indexer float q)
MODE_ROPE = 2
#: rnd(dtype) -> RoPE (rounded to bf16) -> Hadamard -> INT8   (indexer INT8 q)
MODE_ROPE_HAD_Q8 = 3


@njit_kernel
def head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s):
    """Finish one (token, head) row ``buf`` [HD] of a linear output in place and store it:
    ``out_f[t, h]`` (float modes) or ``out_q[t, h]`` + ``out_s[t, h]`` (INT8 mode)."""
    HD = buf.size
    for i in range(HD):
        buf[i] = rnd(buf[i], to_bf16)
    if mode == MODE_ROPE_HAD_Q8:  # apply_rope(..., torch.bfloat16): nope lanes -> bf16 too
        for i in range(HD - 2 * cos.shape[1]):
            buf[i] = rnd(buf[i], True)
        rope(buf, cos[t], sin[t], True)
        fwht(buf, had_scale)
        out_s[t, h] = quant_row_f32(buf, out_q[t, h])
        return
    if mode == MODE_QNORM_ROPE:
        norm_unweighted(buf, eps, to_bf16)
    rope(buf, cos[t], sin[t], to_bf16)
    o = out_f[t, h]
    for i in range(HD):
        o[i] = buf[i]


@njit_kernel(parallel=True)
def heads_vnni(xp, TP, KG, wp, wsum128, sx, sw, T, H, HD, mode, to_bf16, eps, cos, sin,
               had_scale, out_f, out_q, out_s):
    """Per-head W8A8 GEMM (VNNI) + dequant + :func:`head_epilogue`; one head per
    ``prange`` iteration. Needs ``HD % 16 == 0`` and a weight packed in the process's tile
    layout (``wsum128``: its zero-point term, 0 for ``"avx2"``)."""
    nblk = HD // 16
    for h in prange(H):
        acc = np.empty(TP * HD, np.int32)
        acc_cols_vnni(xp, TP, KG, wp, h * nblk, nblk, acc)
        buf = np.empty(HD, np.float32)
        n0 = h * HD
        for t in range(T):
            st = sx[t]
            for i in range(HD):
                n = n0 + i
                a = np.float32(np.int32(acc[t * HD + i] - wsum128[n]))
                buf[i] = np.float32(np.float32(a * st) * sw[n])
            head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s)


@njit_kernel(parallel=True)
def heads_generic(int8, y, xq, sx, wq, sw, T, H, HD, mode, to_bf16, eps, cos, sin, had_scale,
                  out_f, out_q, out_s):
    """The intrinsic-free sibling of :func:`heads_vnni`, one head per ``prange``
    iteration: with ``int8`` the W8A8 GEMM as plain exact int32 dot products on the
    ``[N, K]`` int8 weight ``wq`` (fallback: no VNNI or ``HD % 16 != 0``) + dequant; else
    the rows of a float linear output ``y`` [T, H·HD]. Then :func:`head_epilogue`."""
    for h in prange(H):
        n0 = h * HD
        acc = np.empty(T * HD if int8 else 0, np.int32)
        if int8:
            acc_cols_plain(xq, T, wq, n0, HD, acc)
        buf = np.empty(HD, np.float32)
        for t in range(T):
            if int8:
                st = sx[t]
                for i in range(HD):
                    buf[i] = np.float32(np.float32(np.float32(acc[t * HD + i]) * st) * sw[n0 + i])
            else:
                for i in range(HD):
                    buf[i] = y[t, n0 + i]
            head_epilogue(mode, buf, t, h, to_bf16, eps, cos, sin, had_scale, out_f, out_q, out_s)


def heads_float(y: np.ndarray, T: int, H: int, HD: int, mode: int, to_bf16: bool, eps, cos, sin,
                had_scale, out_f, out_q, out_s) -> None:
    """:func:`head_epilogue` over the rows of a float linear output ``y`` [T, H·HD]."""
    heads_generic(False, y, NO_I8, NO_SX, NO_I8, NO_SX, T, H, HD, mode, to_bf16, np.float32(eps),
                  cos, sin, np.float32(had_scale), out_f, out_q, out_s)


#: Placeholder arrays for the unused outputs / operands of a kernel mode.
NO_F = np.zeros((1, 1, 1), np.float32)
NO_Q = np.zeros((1, 1, 1), np.int8)
NO_S = np.zeros((1, 1), np.float32)
NO_U8 = np.zeros(1, np.uint8)
NO_I8 = np.zeros((1, 1), np.int8)
NO_SX = np.zeros(1, np.float32)
NO_Y = np.zeros((1, 1), np.float32)


def quantize_activations(x: np.ndarray, pw: PackedW8A8) -> tuple:
    """Per-token INT8 of float32 ``x`` [T, K] for ``pw``'s kernel family: returns
    ``(xp_or_xq, sx, TP)``."""
    T, K = x.shape
    sx = np.empty(T, np.float32)
    if is_tiled(pw.layout):
        TP = padded_rows(T)
        xp = np.empty(pw.kp * TP, np.uint8)
        quant_act(x, 1, TP, pw.kp // 4, xp, NO_I8, sx)
        return xp, sx, TP
    xq = np.empty((T, K), np.int8)
    quant_act(x, 2, T, 1, NO_U8, xq, sx)
    return xq, sx, T


def run_heads_w8a8(act: tuple, pw: PackedW8A8, T: int, H: int, HD: int, mode: int,
                   to_bf16: bool, eps: float, cos: np.ndarray, sin: np.ndarray,
                   had_scale: float, out_f: np.ndarray, out_q: np.ndarray,
                   out_s: np.ndarray) -> None:
    """Dispatch the per-head W8A8 kernel for quantised activations ``act``
    (from :func:`quantize_activations`)."""
    xa, sx, TP = act
    if is_tiled(pw.layout):
        sized(heads_vnni, T * pw.k * H * HD)(xa, TP, pw.kp // 4, pw.data, pw.wsum128, sx, pw.scale, T, H, HD, mode,
                                             to_bf16, np.float32(eps), cos, sin, np.float32(had_scale), out_f, out_q,
                                             out_s)
    else:
        sized(heads_generic, T * pw.k * H * HD)(True, NO_Y, xa, sx, pw.data, pw.scale, T, H, HD, mode, to_bf16,
                                                np.float32(eps), cos, sin, np.float32(had_scale), out_f, out_q, out_s)


def check_quant_weight(w: QuantWeight, n_out: int, k_in: int, name: str) -> None:
    """ValueError unless ``w`` is ``[n_out, k_in]`` (names the weight)."""
    if tuple(w.shape) != (n_out, k_in):
        raise ValueError(f"{name}: expected [{n_out}, {k_in}], got {tuple(w.shape)}")
