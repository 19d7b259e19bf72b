"""One rank's life for a command run over ``torch.distributed`` (expert parallelism).

:func:`run_rank` joins the group (:class:`.group.RankGroup`), refuses ranks that disagree on
the run settings or the checkpoint (:mod:`.digest`), runs the command's body with a
:class:`RankContext` (sharded load, engine wrapping), meets the others at a final barrier
and leaves. Errors: every failure prints ``error: rank <r>: ...`` on stderr and ends the
process with ``os._exit`` (3 for a peer / consistency failure, 2 for a local error, after
leaving a note for the others' diagnosis): a gloo group whose peers are gone must not be
torn down politely (that can block).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch

from .digest import check_same, checkpoint_digest, settings_digest
from .expert_parallel import (
    FAULT_ENV,
    ExpertParallelOps,
    ExpertShard,
    RemoteExpert,
    inject_fault,
    local_bytes,
    parse_fault,
)
from .group import RankFailure, RankGroup

__all__ = ["RankContext", "run_rank", "default_threads"]


def runtime_fingerprint() -> dict:
    """What else must agree for the replicated layers to compute bitwise alike on every rank:
    the torch, Numba and Python versions and the kernels' CPU tier (``LLM_KERNELS_TIER``
    forces a common one on mixed hosts)."""
    import platform

    import numba

    from ..kernels.common import jit

    return dict(torch=torch.__version__, numba=numba.__version__, python=platform.python_version(),
                tier=jit.dispatch_tier())


def default_threads() -> int:
    """Threads per rank when not given: this host's CPUs / ``LOCAL_WORLD_SIZE`` (>= 1)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        n = max(1, int(local))
    except ValueError:
        n = 1
    return max(1, (os.cpu_count() or 1) // n)


class RankContext:
    """What a command body needs on one rank.

    Attributes: ``group`` (:class:`RankGroup`), ``rank``, ``world_size``, ``is_root``
    (rank 0 writes outputs), ``shard`` (:class:`ExpertShard`, after :meth:`load`),
    ``ops`` (:class:`ExpertParallelOps`, after :meth:`wrap`), ``after_barrier`` (callables
    run once every rank finished the body: output goes into place only then)."""

    def __init__(self, group: RankGroup):
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.is_root = self.rank == 0
        self.shard: ExpertShard | None = None
        self.loaded_bytes = 0  # bytes of the tensors this rank loaded (as loaded, before packing)
        self.ops: ExpertParallelOps | None = None
        self.after_barrier: list[Callable[[], None]] = []  # e.g. rank 0 renames its output into place

    def load(self, path: Path, dtype: torch.dtype, quant: str | None):
        """``(cfg, weights)``: this rank's shard of the checkpoint: every tensor but the
        other ranks' routed experts, which are :class:`RemoteExpert` placeholders.

        Raises ValueError when the model has no routed experts (``n_routed_experts``) or
        the ranks do not divide them; CheckpointError / ConfigError from the loader."""
        from ..checkpoint import load_checkpoint
        from ..models import load_config
        from ..runtime.memory import prompt_release

        cfg = load_config(path)
        E = getattr(cfg, "n_routed_experts", None)
        if not E:
            raise ValueError(f"--nproc {self.world_size}: this checkpoint's model has no routed experts "
                             "(n_routed_experts); expert parallelism needs an MoE model")
        self.shard = ExpertShard(int(E), self.world_size, self.rank)
        rejected: set[str] = set()
        prompt_release()
        cfg, weights = load_checkpoint(path, dtype=dtype, progress=False, quant=quant,
                                       select=self.shard.select(rejected))
        self.loaded_bytes = local_bytes(weights)
        weights.update(self.shard.placeholders(rejected))
        return cfg, weights

    def wrap(self, engine):
        """Swap the engine's ``ops`` namespace for the expert-parallel one (the engine calls
        ``self.ops.moe``; its prepared weights are kept), then wait for every rank to have
        loaded (:meth:`RankGroup.meet`: no timeout while they are alive). Raises ValueError
        when the engine has no ``ops.moe`` stage, RankFailure when a rank died meanwhile."""
        ops = getattr(engine, "ops", None)
        if ops is None or not hasattr(ops, "moe"):
            raise ValueError(f"{type(engine).__name__} has no ops.moe stage: expert parallelism does not apply")
        fault = parse_fault(os.environ.get(FAULT_ENV))
        timing = os.environ.get("LLM_KERNELS_EP_TIMING", "")
        if timing not in ("", "split"):
            raise ValueError(f"LLM_KERNELS_EP_TIMING must be 'split' or unset, got {timing!r}")
        self.ops = ExpertParallelOps(ops, self.shard, on_fault=self.group.fail, fault=fault,
                                     split_timing=timing == "split")
        engine.ops = self.ops
        inject_fault(fault, self.rank, 0)
        self.group.meet("finish loading")  # waits for slow loaders as long as they are alive
        return engine

    def memory_line(self, weights: dict) -> str:
        """``rank r: experts [a, b) of E, N remote expert weights, loaded X MiB, RSS Y MiB
        (peak Z MiB)`` (loaded: the tensors as read, before the backend's packing)."""
        from ..runtime.memory import rss

        m = rss()
        sh = self.shard
        remote = sum(isinstance(w, RemoteExpert) for w in weights.values())
        mib = 2.0 ** 20
        return (f"rank {self.rank}: experts [{sh.first}, {sh.first + sh.per_rank}) of {sh.n_experts}, "
                f"{remote} remote expert weights, loaded {self.loaded_bytes / mib:.1f} MiB, "
                f"RSS {(m['rss'] or 0) / mib:.1f} MiB (peak {(m['peak'] or 0) / mib:.1f} MiB)")


def _die(code: int, msg: str | None) -> None:
    if msg is not None:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run_rank(body: Callable[[RankContext], int], *, rank: int, world_size: int, timeout: float,
             settings: dict, checkpoint: Path) -> int:
    """Run ``body(ctx)`` as rank ``rank`` of ``world_size``; returns its exit code.

    ``settings`` (the run's options that must agree on every rank, completed with
    :func:`runtime_fingerprint`) and ``checkpoint`` are compared across ranks first
    (:func:`.digest.check_same`). Failures end the process
    (see the module docstring)."""
    try:
        group = RankGroup(rank, world_size, timeout)
    except RankFailure as e:
        _die(3, str(e))
    except ValueError as e:
        _die(2, f"rank {rank}: {e}")
    ctx = RankContext(group)
    try:
        check_same(group, settings_digest({**settings, **runtime_fingerprint()}),
                   "run settings (command-line options, threads, torch / Numba / Python versions, kernels tier)")
        try:
            digest = checkpoint_digest(checkpoint)
        except OSError as e:
            digest = b"unreadable: " + str(e).encode()[:64]
        check_same(group, digest, "checkpoint (config.json, tensor headers, data samples)")
        rc = body(ctx)
        group.barrier("the final barrier")
        for fn in ctx.after_barrier:
            fn()
    except RankFailure as e:
        group.note(str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        group.linger()
        _die(3, None)
    except Exception as e:  # a local error: leave a note, then go (the others diagnose it)
        group.note(f"{type(e).__name__}: {e}")
        print(f"error: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        group.linger()
        _die(2, None)
    group.close()
    return rc
