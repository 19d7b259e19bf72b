"""Loading a checkpoint and building its engine, shared by the CLI (``generate``, ``logits``,
``profile``) and the Python API (:class:`llm_kernels.api.LLM`), so both run the same engine.

* :func:`load_model`: the checkpoint directory (default: the embedded ``mini`` checkpoint)
  -> ``(path, cfg, weights)``, quantizing on load for ``quant``;
* :func:`build_engine`: the model's engine (its spec's ``make_engine``) over those weights;
* :func:`set_threads`: torch's and the Numba kernels' thread count;
* :func:`warm_up`: compile / load the kernels on a throwaway sequence, announcing a cold
  kernel cache on stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from .engine_core import DEFAULT_PREFILL_CHUNK, check_chunk_tokens

__all__ = ["DTYPES", "load_model", "build_engine", "set_threads", "warm_up", "BACKENDS"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = ("fused", "reference")


def load_model(path: str | os.PathLike | None, dtype: torch.dtype, quant: str | None = None,
               progress: bool = True, mtp: bool = False):
    """``(checkpoint path, cfg, weights)`` of ``path`` (None: the embedded default checkpoint,
    written on first use), weights in ``dtype``, quantized on load for ``quant`` (a scheme
    :func:`~llm_kernels.checkpoint.load_checkpoint` knows, e.g. "w8a8" / "int8"; None /
    "none": as stored). ``progress``: tqdm bars (they turn themselves off when
    stderr is not a terminal). ``mtp``: also load the model's multi-token-prediction
    blocks (speculative decoding).

    Raises CheckpointError / ConfigError for a bad checkpoint, ValueError for a bad quant
    (from the loader)."""
    from ..checkpoint import load_checkpoint
    from ..checkpoint.defaults import default_checkpoint
    from .memory import prompt_release

    prompt_release()  # freed float / raw INT8 copies go back to the OS during load (peak RSS)
    ckpt = Path(path).expanduser() if path is not None else default_checkpoint(progress=progress)
    cfg, weights = load_checkpoint(ckpt, dtype=dtype, progress=progress, quant=quant, mtp=mtp)
    return ckpt, cfg, weights


def build_engine(weights: dict, cfg, dtype: torch.dtype, max_seq_len: int, backend: str, timer=None,
                 batch: int = 1, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 layers: tuple[int, int] | None = None):
    """The runtime engine of ``cfg``'s model (its spec's ``make_engine``), sized for ``batch``
    sequences of ``max_seq_len`` tokens, running steps of more than ``prefill_chunk`` rows
    as chunks of at most that many (0 / None: never; see ``EngineCore.step``); ``layers``:
    ``(first, stop)``, one pipeline stage's decoder layers (default all). The engine
    consumes ``weights`` (their entries become the prepared forms; raw INT8 copies are freed
    as they are packed).

    Raises ValueError for an unknown ``backend``, a bad size or a bad ``prefill_chunk``."""
    from .. import models
    from .memory import trim

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_seq_len < 1 or batch < 1:
        raise ValueError(f"max_seq_len and batch must be >= 1, got {max_seq_len} and {batch}")
    prefill_chunk = check_chunk_tokens(prefill_chunk)
    engine = models.spec_for_config(cfg).make_engine(weights, cfg, dtype=dtype, max_seq_len=max_seq_len,
                                                     backend=backend, timer=timer, max_batch=batch,
                                                     consume_weights=True,
                                                     **({} if layers is None else {"layers": layers}))
    engine.prefill_chunk = prefill_chunk
    trim()
    return engine


def set_threads(n: int) -> None:
    """Torch's intra-op threads AND the Numba kernels' threads. Raises ValueError unless
    ``n`` is in [1, number of CPUs]."""
    ncpu = os.cpu_count() or 1
    if not 1 <= n <= ncpu:
        raise ValueError(f"threads must be in [1, {ncpu}] (this machine's CPUs), got {n}")
    torch.set_num_threads(n)
    import numba

    from ..kernels.common import jit  # noqa: F401  (sets Numba's cache dir and threading layer first)

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def warm_up(engine, prompt: list[int], backend: str) -> float:
    """Run the prompt's prefill shape (chunked as the engine chunks it) and one decode step
    on a throwaway sequence so that kernel compilation (or loading from the Numba cache)
    never enters a tok/s figure.
    Says so on stderr when the kernel cache is cold. Returns the seconds it took."""
    cold = False
    if backend == "fused":
        from ..kernels.common import jit

        cold = jit.cached_kernel_count() == 0
        if cold:
            print(f"compiling the kernels (once; cached in {jit.kernel_cache_dir()})...", file=sys.stderr,
                  flush=True)
    t0 = time.perf_counter()
    sid = engine.add_sequence()
    try:
        engine.step([sid], [prompt], logits_rows="last")
        engine.decode([sid], [prompt[0]])
    finally:
        engine.release(sid)
    sec = time.perf_counter() - t0
    if cold:
        print(f"compiled the kernels in {sec:.1f} s; later runs load them from the cache", file=sys.stderr)
    return sec
