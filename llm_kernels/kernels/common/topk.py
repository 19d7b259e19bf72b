"""Row-wise top-k indices of float32 scores with ``-inf`` masking and stable ties.

Contract (what ``torch.topk(scores, k, sorted=True)`` gives, made deterministic): for each
row of ``scores`` ``[R, N]`` return the indices of the ``k`` largest *valid* entries, best
first; equal scores are ordered by lower index (so the selected set among ties is the
lowest-indexed one); an entry is invalid when its score is ``-inf`` (the masking value) or
NaN. A row with fewer than ``k`` valid entries is padded with ``-1``. ``k`` may exceed N.

Algorithm (O(N) per row, no full sort): scores are mapped to order-preserving uint32 keys
(``b ^ 0x80000000`` for non-negative floats, ``~b`` for negative ones; -0.0 and +0.0 are
distinct keys but tie-broken consistently), the k-th largest key is found by a 3-pass
radix select (11/11/10 bits, histograms over the row), everything above the threshold
plus the lowest-indexed entries equal to it are gathered in index order, and only those
``k`` are sorted by (key desc, index asc). Rows are independent ``prange`` iterations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import prange

from .bf16 import as_kernel_input, f32_bits
from .jit import njit_kernel, sized

__all__ = ["topk_rows_f32", "topk_indices"]

_NEG_INF_BITS = np.uint32(0xFF800000)


@njit_kernel
def _key(v):
    """Order-preserving uint32 key of a float32; 0 marks an invalid entry (-inf or NaN)."""
    b = f32_bits(v)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) or b == _NEG_INF_BITS:
        return np.uint32(0)
    if b & np.uint32(0x80000000):
        return np.uint32(~b)
    return np.uint32(b | np.uint32(0x80000000))


@njit_kernel
def _topk_row(row, k, keys, out):
    N = row.size
    nvalid = 0
    for i in range(N):
        kv = _key(row[i])
        keys[i] = kv
        if kv != 0:
            nvalid += 1
    kk = min(k, nvalid)
    for j in range(kk, k):
        out[j] = -1
    if kk == 0:
        return
    # radix select of the kk-th largest key: prefix bits fixed from the top
    hist = np.zeros(2048, np.int64)
    prefix = np.uint32(0)
    pmask = np.uint32(0)
    need = kk  # rank (1-based, from the top) still to locate inside the current prefix
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        nb = 1 << bits
        for b in range(nb):
            hist[b] = 0
        bm = np.uint32(nb - 1)
        for i in range(N):
            kv = keys[i]
            if kv != 0 and (kv & pmask) == prefix:
                hist[(kv >> np.uint32(shift)) & bm] += 1
        b = nb - 1
        while True:
            if hist[b] >= need:
                break
            need -= hist[b]
            b -= 1
        prefix = np.uint32(prefix | (np.uint32(b) << np.uint32(shift)))
        pmask = np.uint32(pmask | (bm << np.uint32(shift)))
    thr = prefix  # the kk-th largest key; `need` entries equal to it are taken
    sel = np.empty(kk, np.uint64)
    m = 0
    eq_left = need
    for i in range(N):
        kv = keys[i]
        if kv > thr or (kv == thr and kv != 0 and eq_left > 0):
            if kv == thr:
                eq_left -= 1
            # ascending sort of (~key, index) == key desc, index asc
            sel[m] = (np.uint64(~kv & np.uint32(0xFFFFFFFF)) << np.uint64(32)) | np.uint64(i)
            m += 1
    sel.sort()
    for j in range(kk):
        out[j] = np.int64(sel[j] & np.uint64(0xFFFFFFFF))


@njit_kernel(parallel=True)
def _topk_rows(scores, k, out):
    R, N = scores.shape
    for r in prange(R):
        keys = np.empty(N, np.uint32)
        _topk_row(scores[r], k, keys, out[r])


#: The Numba kernel of :func:`topk_indices` for callers that hold its checked inputs
#: already: ``(scores [R, N] C-contiguous float32 with N >= 1, k, out [R, k] int64)``.
topk_rows_f32 = _topk_rows


def topk_indices(scores: Any, k: int) -> Any:
    """Indices of the ``k`` best valid scores of each row, best first, ties -> lower index.

    Args:
        scores: ``[..., N]`` float32 (or bf16) CPU torch tensor / numpy array. ``-inf``
            and NaN entries are never selected.
        k: number of indices per row (>= 0; may exceed N).

    Returns:
        int64 ``[..., k]`` (torch tensor for torch input, else numpy); ``-1`` pads rows
        with fewer than ``k`` valid entries.

    Raises:
        TypeError: unsupported input. ValueError: negative k or 0-dim scores.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    a, is_bf16 = as_kernel_input(scores, "scores")
    if a.ndim == 0:
        raise ValueError("scores must have at least one dim [..., N]")
    if is_bf16:
        a = (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    lead, N = a.shape[:-1], a.shape[-1]
    a2 = np.ascontiguousarray(a.reshape(math.prod(lead), N))
    out = np.empty((a2.shape[0], int(k)), np.int64)
    if out.size:
        if N == 0:
            out[:] = -1
        else:
            sized(_topk_rows, a2.size)(a2, int(k), out)
    out = out.reshape(*lead, int(k))
    if isinstance(scores, np.ndarray):
        return out
    import torch

    return torch.from_numpy(out)
