"""``python -m llm_kernels serve``: load a checkpoint folder (weights, tokenizer, generation
config), size the engine's cache for ``--max-batch`` sequences of ``--max-seq-len`` tokens,
warm the kernels up, and run the app (:mod:`.app`) with uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ..runtime.engine_core import DEFAULT_PREFILL_CHUNK

__all__ = ["load_server", "serve_main", "add_serve_args"]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options (``--backend``/``--quant`` come from the CLI's
    shared ``_backend_args``)."""
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="model folder: config.json, safetensors, tokenizer.json (+ tokenizer_config.json, "
                        "generation_config.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: all CPUs)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a free slot at most; beyond it a 503 (default 64)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default min(4096, the model's "
                        "max_position_embeddings))")
    p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: the folder name)")
    from ..cli_generate import add_prefill_chunk_arg

    add_prefill_chunk_arg(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from ..cli_ranks import add_rank_args

    add_rank_args(p, "serve")


def _check_sizes(max_batch: int, max_queue: int, max_seq_len: int | None, port: int | None = None) -> None:
    for name, v, lo in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {max_seq_len}")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")


def load_server(checkpoint: Path, *, backend: str = "fused", quant: str | None = None, dtype: str = "bfloat16",
                max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                model_name: str | None = None, threads: int | None = None, warm: bool = True,
                prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, ranks=None):
    """Load ``checkpoint`` (through :class:`llm_kernels.api.LLM`, the engine sized for
    ``max_batch`` sequences of ``max_seq_len`` tokens; prompts prefilled in steps of at most
    ``prefill_chunk`` rows, 0 / None: whole) and build the app. Returns
    ``(app, engine, tokenizer, ServeConfig)``.

    ``ranks``: a :class:`~llm_kernels.distributed.runner.RankContext` when this process is
    one rank of a group (``serve --nproc``): the engine is this rank's part; on rank 0 it is
    wrapped in an :class:`~llm_kernels.distributed.mirror.EngineMirror` (the other ranks
    repeat its calls) before the warm-up; on the other ranks the app is None (they run
    :func:`~llm_kernels.distributed.mirror.follow`).

    Raises ValueError naming the option for a bad size, TokenizerError when the folder has
    no ``tokenizer.json``, and the loaders' CheckpointError / ConfigError for a bad folder."""
    from ..api import LLM
    from ..errors import TokenizerError
    from ..runtime.builder import warm_up
    from .app import ServeConfig, create_app

    _check_sizes(max_batch, max_queue, max_seq_len)
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {checkpoint}: not a directory (a model folder with config.json, the "
                         "safetensors and the tokenizer files)")
    if not (checkpoint / "tokenizer.json").is_file():  # before loading gigabytes of weights
        raise TokenizerError(f"{checkpoint / 'tokenizer.json'}: missing; the server needs the model's tokenizer "
                             "files (tokenizer.json, tokenizer_config.json) in the checkpoint folder")
    llm = LLM(checkpoint, backend=backend, quant=quant, dtype=dtype, max_seq_len=max_seq_len, threads=threads,
              max_batch=max_batch, progress=ranks is None or ranks.is_root, prefill_chunk=prefill_chunk, ranks=ranks)
    engine, tokenizer, cfg = llm.engine, llm.tokenizer, llm.cfg
    if ranks is not None:
        if not ranks.is_root:
            return None, engine, tokenizer, None
        from ..distributed.mirror import EngineMirror

        engine = EngineMirror(engine, ranks.group)
    t_warm = warm_up(engine, [i % cfg.vocab_size for i in range(1, 9)], backend) if warm else 0.0
    scfg = ServeConfig(model_name=model_name or checkpoint.name, checkpoint=checkpoint, max_batch=max_batch,
                       max_queue=max_queue, max_seq_len=llm.max_seq_len,
                       info={"backend": backend, "quant": quant, "dtype": dtype, "warm_up_s": round(t_warm, 3),
                             "threads": torch.get_num_threads(), "model": cfg.summary(), "tier": _tier(backend),
                             "vocab_size": min(cfg.vocab_size, tokenizer.vocab_size)})
    return create_app(engine, tokenizer, scfg), engine, tokenizer, scfg


def _tier(backend: str) -> str | None:
    if backend != "fused":
        return None
    from ..kernels.common.jit import dispatch_tier

    return dispatch_tier()


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted (``serve`` subcommand)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"error: serve needs FastAPI and uvicorn ({e}); install the extra: "
                         "pip install -e '.[serve]'") from None

    _check_sizes(args.max_batch, args.max_queue, args.max_seq_len, args.port)
    from ..cli_ranks import rank_entry

    where = rank_entry(args)
    if isinstance(where, int):  # the local ranks ran (--nproc N): their exit code
        return where
    if where is not None:  # this process is one rank
        return _serve_ranks(args, *where)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app, engine, tok, scfg = load_server(args.checkpoint, backend=args.backend, quant=args.quant, dtype=args.dtype,
                                         max_batch=args.max_batch, max_queue=args.max_queue,
                                         max_seq_len=args.max_seq_len, model_name=args.model_name,
                                         threads=args.threads or None, prefill_chunk=args.prefill_chunk)
    print(f"serving {scfg.model_name!r} ({scfg.info['model']}; backend {args.backend}, quant {args.quant}, "
          f"{scfg.info['threads']} threads) on http://{args.host}:{args.port}/v1 — max batch {scfg.max_batch}, "
          f"max queue {scfg.max_queue}, max seq len {scfg.max_seq_len}; warm-up {scfg.info['warm_up_s']:.1f} s",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _serve_ranks(args: argparse.Namespace, rank: int, world: int) -> int:
    """``serve`` as one rank of a group (``--nproc N [--pp K]`` or torchrun): rank 0 loads
    its part, serves HTTP and publishes its engine calls; the other ranks load theirs and
    repeat those calls (:mod:`llm_kernels.distributed.mirror`) until rank 0 stops."""
    import signal

    import uvicorn

    from ..cli_ranks import check_layout
    from ..distributed.mirror import follow
    from ..distributed.runner import default_threads, run_rank

    layout = check_layout(args.checkpoint, world, args.pp, rank)  # before the rendezvous
    threads = args.threads or default_threads()
    settings = dict(command="serve", world=world, pp=layout.pp, dtype=args.dtype, quant=args.quant,
                    backend=args.backend, threads=threads, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    prefill_chunk=args.prefill_chunk)

    def body(ctx) -> int:
        app, engine, _, scfg = load_server(args.checkpoint, backend=args.backend, quant=args.quant, dtype=args.dtype,
                                           max_batch=args.max_batch, max_queue=args.max_queue,
                                           max_seq_len=args.max_seq_len, model_name=args.model_name,
                                           threads=threads, prefill_chunk=args.prefill_chunk, ranks=ctx)
        print(ctx.memory_line(getattr(engine, "w", {})), file=sys.stderr, flush=True)
        if not ctx.is_root:  # rank 0 leads the shutdown (Ctrl-C reaches every rank of a terminal's group)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(engine, ctx.group)
            return 0
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        print(f"serving {scfg.model_name!r} ({scfg.info['model']}; backend {args.backend}, quant {args.quant}) over "
              f"{ctx.layout.describe()}, {threads} thread(s) per rank, on http://{args.host}:{args.port}/v1 — max "
              f"batch {scfg.max_batch}, max queue {scfg.max_queue}, max seq len {scfg.max_seq_len}; warm-up "
              f"{scfg.info['warm_up_s']:.1f} s", file=sys.stderr, flush=True)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
        finally:
            engine.stop()
        return 0

    return run_rank(body, rank=rank, world_size=world, timeout=args.ep_timeout, settings=settings,
                    checkpoint=args.checkpoint, layout=layout)
