"""Fused ``embed`` stage (reference: ``reference.deepseek_v4.model.embed``, spec §2).

One Numba pass: gather each token's embedding row (bf16 bits or float32), round it to the
activation dtype (the reference's ``rnd``: round to nearest even, bitwise torch's
``.to(bfloat16)``) and copy it into every HC stream. The id range is checked inside the
same pass; the error names the offending values like the reference's.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from ..common.bf16 import load_f32, torch_kernel_view
from ..common.bf16 import round_f32 as _round
from ..common.jit import njit_kernel, sized
from .stage_shared import i64_np

__all__ = ["embed"]


@njit_kernel(parallel=True)
def _embed_rows(table, ids, to_bf16, out):
    """out[t, h, :] = rnd(table[ids[t], :]) for every stream h; ``table`` [V, D] float32 or
    uint16 (bf16 bits). Returns the number of ids outside [0, V) (their rows are left
    unwritten)."""
    T, HC, D = out.shape
    V = table.shape[0]
    bad = 0
    for t in prange(T):
        i = ids[t]
        if i < 0 or i >= V:
            bad += 1
            continue
        src = table[i]
        o0 = out[t, 0]
        for d in range(D):
            o0[d] = _round(load_f32(src[d]), to_bf16)
        for h in range(1, HC):
            oh = out[t, h]
            for d in range(D):
                oh[d] = o0[d]
    return bad


def embed(weights: dict[str, torch.Tensor], cfg, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token embedding copied into every HC stream: ``input_ids`` [T] integer -> x_hc
    [T, hc_mult, D] float32 holding ``dtype`` values (the reference's contract, bitwise).
    ``weights["embed.weight"]`` [vocab_size, D] bf16 or float32. Raises ValueError for an
    id outside [0, vocab_size) or ``input_ids`` that is not 1-D."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D [T], got shape {tuple(input_ids.shape)}")
    w = weights["embed.weight"]
    table = torch_kernel_view(w)  # bf16 bits or float32 (registered at load: no conversion)
    ids = i64_np(input_ids)
    V = min(int(cfg.vocab_size), table.shape[0])
    out = np.empty((ids.shape[0], cfg.hc_mult, table.shape[1]), np.float32)
    if ids.shape[0] and sized(_embed_rows, out.size)(table[:V], ids, dtype == torch.bfloat16, out):
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got min {int(ids.min())} "
                         f"max {int(ids.max())}")
    return torch.from_numpy(out)
