"""One rank's life for a command run over ``torch.distributed`` (expert and pipeline parallelism).

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
import torch.distributed as dist

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
from .layout import RankLayout
from .pipeline import StageLink

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
    (rank 0 prints and writes outputs), ``layout`` (:class:`RankLayout`: pipeline stage and
    expert shard, set by :func:`run_rank` from ``pp``), ``shard`` (:class:`ExpertShard` of
    this stage's experts, after :meth:`load`; None without expert parallelism), ``ops``
    (:class:`ExpertParallelOps`, after :meth:`wrap`; None without expert parallelism),
    ``pipe`` (:class:`StageLink`, after :meth:`wrap`; None with one stage),
    ``after_barrier`` (callables run once every rank finished the body: output goes into
    place only then).

    A command body runs ``cfg, weights = ctx.load(...)``, builds its engine with
    ``make_engine(..., **ctx.engine_kwargs())`` and passes it through :meth:`wrap`; then it
    runs exactly as in one process (every rank gets the same logits)."""

    def __init__(self, group: RankGroup, layout: RankLayout | None = None):
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.is_root = self.rank == 0
        self.layout = layout
        self.shard: ExpertShard | None = None
        self.loaded_bytes = 0  # bytes of the tensors this rank loaded (as loaded, before packing)
        self.ops: ExpertParallelOps | None = None
        self.pipe: StageLink | None = None
        self.after_barrier: list[Callable[[], None]] = []  # e.g. rank 0 renames its output into place

    def _stage_keep(self, cfg) -> Callable[[str], bool]:
        """The load predicate of this rank's pipeline stage (every tensor with one stage)."""
        from ..models import spec_for_config

        lay = self.layout
        if lay.pp == 1:
            return lambda name: True
        part = spec_for_config(cfg).pipeline_part
        if part is None:
            raise ValueError(f"--pp {lay.pp}: the {type(cfg).__name__} model does not say where its tensors live "
                             "(ModelSpec.pipeline_part)")
        first, stop = lay.layers

        def keep(name: str) -> bool:
            p = part(name, cfg)
            if isinstance(p, int):
                return first <= p < stop
            return (p is None or (p in ("embed", "embed_head") and lay.is_first_stage)
                    or (p in ("head", "embed_head") and lay.is_last_stage))

        return keep

    def load(self, path: Path, dtype: torch.dtype, quant: str | None, mtp: bool = False):
        """``(cfg, weights)``: this rank's part of the checkpoint: its stage's layers (plus
        the embedding on the first stage, the head on the last) and, of those layers' routed
        experts, its shard's; the other shards' experts are :class:`RemoteExpert`
        placeholders. ``mtp``: read the MTP block too (``load_checkpoint(mtp=True)``; its
        routed experts are sharded like the layers'; with pipeline stages it goes to the
        last stage, whose engine cannot draft without the embedding).

        Raises ValueError when the layout does not fit the model; CheckpointError /
        ConfigError from the loader."""
        from ..checkpoint import load_checkpoint
        from ..models import load_config
        from ..runtime.memory import prompt_release

        cfg = load_config(path)
        lay = self.layout or RankLayout(self.rank, self.world_size, 1, int(cfg.num_hidden_layers),
                                        int(getattr(cfg, "n_routed_experts", 0) or 0))
        self.layout = lay
        stage_keep = self._stage_keep(cfg)
        rejected: set[str] = set()
        if lay.ep > 1:
            self.shard = ExpertShard(lay.n_experts, lay.ep, lay.ep_rank)
            expert_keep = self.shard.select(rejected)
            select = lambda name: stage_keep(name) and expert_keep(name)  # noqa: E731 (experts of own layers only)
        else:
            select = stage_keep
        prompt_release()
        cfg, weights = load_checkpoint(path, dtype=dtype, progress=False, quant=quant, mtp=mtp,
                                       select=None if lay.world_size == 1 else select)
        self.loaded_bytes = local_bytes(weights)
        if self.shard is not None:
            weights.update(self.shard.placeholders(rejected))
        return cfg, weights

    def engine_kwargs(self) -> dict:
        """Extra ``make_engine`` arguments of this rank: ``layers=(first, stop)`` on a
        pipeline stage, nothing otherwise. Call after :meth:`load`."""
        return {} if self.layout is None or self.layout.pp == 1 else {"layers": self.layout.layers}

    def wrap(self, engine):
        """Make ``engine`` this rank's: with expert shards, swap its ``ops`` namespace for the
        expert-parallel one over this stage's ranks (the engine calls ``self.ops.moe``; its
        prepared weights are kept); with pipeline stages, set its ``pipe`` link. Then wait
        for every rank to have loaded (:meth:`RankGroup.meet`: no timeout while they are
        alive). Raises ValueError when expert shards are asked of an engine without an
        ``ops.moe`` stage, RankFailure when a rank died meanwhile."""
        lay = self.layout
        groups = [dist.new_group(lay.stage_ranks(s)) if lay.pp > 1 and lay.ep > 1 else None
                  for s in range(lay.pp)]  # every rank creates every stage's group, in order
        fault = parse_fault(os.environ.get(FAULT_ENV))
        if lay.ep > 1:
            ops = getattr(engine, "ops", None)
            if ops is None or not hasattr(ops, "moe"):
                raise ValueError(f"{type(engine).__name__} has no ops.moe stage: expert parallelism does not apply")
            timing = os.environ.get("LLM_KERNELS_EP_TIMING", "")
            if timing not in ("", "split"):
                raise ValueError(f"LLM_KERNELS_EP_TIMING must be 'split' or unset, got {timing!r}")
            self.ops = ExpertParallelOps(ops, self.shard, group=groups[lay.stage], on_fault=self.group.fail,
                                         fault=fault, split_timing=timing == "split")
            engine.ops = self.ops
        if lay.pp > 1:
            self.pipe = StageLink(lay, self.group.fail, fault=fault if lay.ep == 1 else None)
            engine.pipe = self.pipe
        inject_fault(fault, self.rank, 0)
        self.group.meet("finish loading")  # waits for slow loaders as long as they are alive
        return engine

    def comm_summary(self, step_seconds: list[float]) -> str:
        """One line per axis in use: the expert combine's bytes and times
        (:meth:`CommStats.summary`) and the pipeline transfers (:meth:`PipeStats.summary`)."""
        lay = self.layout
        out = [lay.describe()]
        if self.ops is not None:
            first, stop = lay.layers
            out.append(self.ops.stats.summary(stop - first, step_seconds))
        if self.pipe is not None:
            out.append(self.pipe.stats.summary())
        return "\n".join(out)

    def memory_line(self, weights: dict) -> str:
        """``rank r: stage s (layers [a, b)), experts [c, d) of E, N remote expert weights,
        loaded X MiB, RSS Y MiB (peak Z MiB)`` (stage / experts when split) (loaded: the tensors as read, before the backend's
        packing)."""
        from ..runtime.memory import rss

        m = rss()
        mib = 2.0 ** 20
        parts = []
        if self.layout is not None and self.layout.pp > 1:
            first, stop = self.layout.layers
            parts.append(f"stage {self.layout.stage} (layers [{first}, {stop}))")
        sh = self.shard
        if sh is not None:
            remote = sum(isinstance(w, RemoteExpert) for w in weights.values())
            parts.append(f"experts [{sh.first}, {sh.first + sh.per_rank}) of {sh.n_experts}, {remote} remote expert "
                         "weights")
        parts.append(f"loaded {self.loaded_bytes / mib:.1f} MiB, RSS {(m['rss'] or 0) / mib:.1f} MiB "
                     f"(peak {(m['peak'] or 0) / mib:.1f} MiB)")
        return f"rank {self.rank}: " + ", ".join(parts)


def _die(code: int, msg: str | None) -> None:
    if msg is not None:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run_rank(body: Callable[[RankContext], int], *, rank: int, world_size: int, timeout: float,
             settings: dict, checkpoint: Path, layout: RankLayout | None = None) -> int:
    """Run ``body(ctx)`` as rank ``rank`` of ``world_size``; returns its exit code.
    ``layout``: pipeline stages x expert shards (default: expert shards only, one stage).

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
    ctx = RankContext(group, layout)
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
