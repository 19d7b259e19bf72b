"""The command-line side of running a command over ranks (``--nproc``, ``--pp``,
``--ep-timeout``), shared by ``logits``, ``generate`` and ``bench``: validate the options,
start N local ranks (:func:`~llm_kernels.distributed.spawn_local`) or, under ``torchrun``
(``RANK`` / ``WORLD_SIZE`` set), say which rank this process is. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_rank_args", "rank_entry", "check_layout"]


def add_rank_args(p: argparse.ArgumentParser, command: str) -> None:
    """Add ``--nproc``, ``--pp`` and ``--ep-timeout`` to ``command``'s parser."""
    p.add_argument("--nproc", type=int, default=0,
                   help="run over N local ranks (torch.distributed, gloo over TCP): routed experts sharded over each "
                        "stage's ranks, layers split over --pp pipeline stages; rank 0 prints and writes outputs. Under "
                        "torchrun the ranks come from its environment (docs/distributed.md)")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=0,
                   help="pipeline stages (contiguous layer ranges) among the ranks; the rest of the ranks shard the "
                        "routed experts of each stage. Default: 1 for a model with routed experts (expert parallelism "
                        "only), every rank for a dense model (Qwen3)")
    p.add_argument("--ep-timeout", type=float, default=60.0,
                   help="seconds a rank waits for the others in a collective before naming the one that stopped "
                        "(default 60)")


def check_layout(checkpoint: Path, world: int, pp: int, rank: int = 0):
    """The :class:`~llm_kernels.distributed.layout.RankLayout` of ``rank`` for the checkpoint's
    config (``pp`` 0: the default, see :func:`add_rank_args`). Raises SystemExit with the
    reason (``--pp`` not dividing the ranks, more stages than layers, shards not dividing
    the experts)."""
    from .distributed.layout import RankLayout
    from .models import load_config

    cfg = load_config(checkpoint)
    experts = int(getattr(cfg, "n_routed_experts", 0) or 0)
    if pp == 0:
        pp = 1 if experts else world
    try:
        return RankLayout(rank, world, pp, int(cfg.num_hidden_layers), experts)
    except ValueError as e:
        raise SystemExit(f"error: --nproc / --pp: {e}") from None


def rank_entry(args: argparse.Namespace) -> int | tuple[int, int] | None:
    """Where this process stands for a rank-capable command:

    * None: run in this process (no ``--nproc`` > 1 and no torchrun environment);
    * an int: the exit code of the N local ranks this call started and supervised
      (``--nproc N``: each rank runs the same command line again, ``args.raw_argv``);
    * ``(rank, world_size)``: this process is one rank (torchrun or our launcher).

    Raises SystemExit for a bad ``--nproc`` / ``--pp`` / ``--ep-timeout``, a torchrun
    environment that disagrees with ``--nproc``, or a layout the checkpoint cannot take."""
    from .distributed import env_world

    if args.nproc < 0:
        raise SystemExit(f"error: --nproc must be >= 1 (or 0: one process), got {args.nproc}")
    if args.pp < 0:
        raise SystemExit(f"error: --pp must be >= 1 (or 0: the default), got {args.pp}")
    if args.ep_timeout <= 0:
        raise SystemExit(f"error: --ep-timeout must be > 0 seconds, got {args.ep_timeout}")
    try:
        world = env_world()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if world is None and args.nproc > 1:  # start the ranks; each one runs this command again
        from .distributed import spawn_local

        check_layout(args.checkpoint, args.nproc, args.pp)
        return spawn_local(args.raw_argv, args.nproc)
    if world is not None and world[1] > 1:
        if args.nproc not in (0, world[1]):
            raise SystemExit(f"error: --nproc {args.nproc} but WORLD_SIZE={world[1]} (torchrun): give neither or "
                             "the same number")
        check_layout(args.checkpoint, world[1], args.pp, world[0])  # before the rendezvous
        return world
    if args.pp > 1:
        raise SystemExit(f"error: --pp {args.pp} needs as many ranks or a multiple: give --nproc (or run under "
                         "torchrun)")
    return None
