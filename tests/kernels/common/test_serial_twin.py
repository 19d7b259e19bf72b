"""Serial twins (``jit.serial_twin`` / ``jit.sized``): a small call runs the kernel compiled
without parallel regions, and must give the parallel kernel's bits.

* A parallel kernel's twin is another dispatcher; a program that calls a parallel kernel by
  a global or closure name gets a twin calling the callee's twin; a kernel that launches
  nothing is its own twin; ``sized`` hands out the twin below ``SERIAL_WORK`` only.
* Whole decode steps of DeepSeek-V4 and Qwen3 (fused, INT8, bf16; prefill, then ragged
  decode of two sequences) with every call on the parallel kernels
  (``SERIAL_WORK = 0``) and with every call on the twins: the logits are bitwise equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import prange

from llm_kernels import LLM
from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.kernels.common import jit
from llm_kernels.kernels.common.jit import njit_kernel, serial_twin, sized
from llm_kernels.models import preset


@njit_kernel(parallel=True, cache=False)
def _scale_rows(x, out):
    for t in prange(x.shape[0]):
        for d in range(x.shape[1]):
            out[t, d] = x[t, d] * np.float32(3.0)


@njit_kernel(cache=False)
def _program(x, out):
    _scale_rows(x, out)
    return out.sum()


@njit_kernel(cache=False)
def _plain(x):
    return x.sum()


def _make_closure_program():
    k = _scale_rows

    @njit_kernel(cache=False)
    def prog(x, out):
        k(x, out)

    return prog


def test_twins_replace_parallel_kernels_and_give_the_same_values():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    tw = serial_twin(_scale_rows)
    assert tw is not _scale_rows and not tw.targetoptions["parallel"]
    assert serial_twin(_scale_rows) is tw  # memoised
    assert serial_twin(_plain) is _plain  # launches nothing: its own twin
    ptw = serial_twin(_program)
    assert ptw is not _program and ptw.py_func.__globals__["_scale_rows"] is tw
    a, b = np.empty_like(x), np.empty_like(x)
    assert _program(x, a) == ptw(x, b)
    assert np.array_equal(a, b) and np.array_equal(a, x * np.float32(3.0))
    cprog = _make_closure_program()
    ctw = serial_twin(cprog)
    assert ctw is not cprog and ctw.py_func.__closure__[0].cell_contents is tw
    c = np.empty_like(x)
    ctw(x, c)
    assert np.array_equal(c, a)


def test_sized_picks_the_twin_below_the_threshold(monkeypatch):
    monkeypatch.setattr(jit, "SERIAL_WORK", 100)
    assert sized(_scale_rows, 99) is serial_twin(_scale_rows)
    assert sized(_scale_rows, 100) is _scale_rows
    monkeypatch.setattr(jit, "SERIAL_WORK", 0)
    assert sized(_scale_rows, 0) is _scale_rows


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    return {name: write_random_checkpoint(preset(name), root / name, seed=3, dtype=torch.bfloat16, progress=False)
            for name in ("mini", "qwen3-mini")}


def _run(ckpt):
    """Prefill two prompts of different lengths, then 6 decode steps of both: every logit."""
    llm = LLM(ckpt, quant="int8", dtype="bfloat16", max_seq_len=64)
    eng = llm.engine
    sids, lg = eng.prefill([[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8]])
    out = [torch.cat(lg)]
    toks = [int(row[-1].argmax()) for row in lg]
    for _ in range(6):
        lg = eng.decode(list(sids), toks)
        out.append(torch.cat(lg))
        toks = [int(row[-1].argmax()) for row in lg]
    return torch.cat(out)


@pytest.mark.parametrize("name", ["mini", "qwen3-mini"])
def test_engine_steps_bitwise_with_and_without_twins(ckpts, name, monkeypatch):
    monkeypatch.setattr(jit, "SERIAL_WORK", 0)
    parallel = _run(ckpts[name])
    monkeypatch.setattr(jit, "SERIAL_WORK", 1 << 62)
    serial = _run(ckpts[name])
    assert torch.equal(parallel.view(torch.int32), serial.view(torch.int32))
