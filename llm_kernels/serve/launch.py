"""``python -m llm_kernels serve``: load a checkpoint folder (weights, tokenizer, generation
config), size the engine's cache for ``--max-batch`` sequences of ``--max-seq-len`` tokens,
warm the kernels up, and run the app (:mod:`.app`) with uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_server", "serve_main", "add_serve_args", "DEFAULT_MAX_SEQ_LEN"]

DEFAULT_MAX_SEQ_LEN = 4096
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options."""
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="model folder: config.json, safetensors, tokenizer.json (+ tokenizer_config.json, "
                        "generation_config.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["fused", "reference"], default="fused")
    p.add_argument("--quant", choices=["none", "w8a8", "int8"], default=None,
                   help="weights: as stored (default), float, or INT8 quantized on load")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: all CPUs)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a free slot at most; beyond it a 503 (default 64)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"tokens per sequence, prompt + completion (default min({DEFAULT_MAX_SEQ_LEN}, the model's "
                        "max_position_embeddings))")
    p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: the folder name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _check_sizes(max_batch: int, max_queue: int, max_seq_len: int | None, port: int | None = None) -> None:
    for name, v, lo in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {max_seq_len}")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")


def warm_up(engine: Any, prompt_len: int = 8) -> float:
    """One prefill and one decode step on a throwaway sequence (compiles or loads the
    kernels before the first request). Returns the seconds it took."""
    t0 = time.perf_counter()
    sid = engine.add_sequence()
    try:
        ids = [i % engine.cfg.vocab_size for i in range(1, prompt_len + 1)]
        engine.step([sid], [ids], logits_rows="last")
        engine.step([sid], [[ids[0]]], logits_rows="last")
    finally:
        engine.release(sid)
    return time.perf_counter() - t0


def load_server(checkpoint: Path, *, backend: str = "fused", quant: str | None = None, dtype: str = "bfloat16",
                max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                model_name: str | None = None, warm: bool = True):
    """Load ``checkpoint`` and build the app. Returns ``(app, engine, tokenizer, ServeConfig)``.

    Raises ValueError naming the option for a bad size, and the loaders' CheckpointError /
    ConfigError / TokenizerError for a bad folder."""
    from .. import models
    from ..checkpoint import load_checkpoint
    from ..runtime.memory import prompt_release, trim
    from ..text.tokenizer import Tokenizer
    from .app import ServeConfig, create_app

    _check_sizes(max_batch, max_queue, max_seq_len)
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    checkpoint = Path(checkpoint).expanduser()
    tokenizer = Tokenizer.from_dir(checkpoint)  # first: a folder without tokenizer.json fails fast
    prompt_release()
    cfg, weights = load_checkpoint(checkpoint, dtype=_DTYPES[dtype], progress=True, quant=quant)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or DEFAULT_MAX_SEQ_LEN)
    seq_len = min(DEFAULT_MAX_SEQ_LEN, limit) if max_seq_len is None else max_seq_len
    if seq_len > limit:
        raise ValueError(f"--max-seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")
    engine = models.spec_for_config(cfg).make_engine(weights, cfg, dtype=_DTYPES[dtype], max_seq_len=seq_len,
                                                     backend=backend, timer=None, max_batch=max_batch,
                                                     consume_weights=True)
    del weights
    trim()
    t_warm = warm_up(engine) if warm else 0.0
    scfg = ServeConfig(model_name=model_name or checkpoint.name, checkpoint=checkpoint, max_batch=max_batch,
                       max_queue=max_queue, max_seq_len=seq_len,
                       info={"backend": backend, "quant": quant, "dtype": dtype, "warm_up_s": round(t_warm, 3),
                             "threads": torch.get_num_threads(), "model": cfg.summary()})
    return create_app(engine, tokenizer, scfg), engine, tokenizer, scfg


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted (``serve`` subcommand)."""
    import uvicorn

    _check_sizes(args.max_batch, args.max_queue, args.max_seq_len, args.port)
    if args.threads:
        from ..cli import _set_threads

        _set_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app, engine, tok, scfg = load_server(args.checkpoint, backend=args.backend, quant=args.quant, dtype=args.dtype,
                                         max_batch=args.max_batch, max_queue=args.max_queue,
                                         max_seq_len=args.max_seq_len, model_name=args.model_name)
    print(f"serving {scfg.model_name!r} ({scfg.info['model']}; backend {args.backend}, quant {args.quant}, "
          f"{scfg.info['threads']} threads) on http://{args.host}:{args.port}/v1 — max batch {scfg.max_batch}, "
          f"max queue {scfg.max_queue}, max seq len {scfg.max_seq_len}; warm-up {scfg.info['warm_up_s']:.1f} s",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
