"""Expert parallelism (EP): routed experts sharded over ranks, the MoE step as local expert
compute + one all-gather that combines the routes in a fixed order.

Ownership: with ``E`` routed experts and ``N`` ranks (``E % N == 0``), expert ``e`` lives on
rank ``e // (E / N)`` (:class:`ExpertShard`). Each rank loads only its experts
(:meth:`ExpertShard.select`, the ``select`` predicate of
:func:`~llm_kernels.checkpoint.load_checkpoint`); the other experts' weight names hold a
:class:`RemoteExpert` placeholder so that the engine's per-layer expert list keeps its
length ``E``. Everything else (embedding, attention, mHC, router, shared expert, head) is
replicated: every rank computes the same ``x``, routing weights and indices bitwise (same
code, same inputs, same thread count).

The MoE step (:class:`ExpertParallelOps`, a wrapper of the engine's ``ops`` namespace whose
``moe`` has the stage's contract ``moe(x [T, D], w [T, K], idx [T, K], experts, shared, *,
swiglu_limit, dtype) -> [T, D]``):

1. **dispatch** (local, 0 bytes: the token rows are replicated): the routes ``(t, k)``
   whose expert this rank owns, in key order ``t * K + k``;
2. the wrapped backend's own ``moe`` on those rows with ``K = 1``, weight 1 and a null
   shared expert (intermediate size 0, output 0): its result row is ``rnd(y_e(x_t))``, the
   expert output exactly as the single-process ``moe`` holds it before weighting (each
   expert sees the same rows in the same order as in one process, so even float GEMMs
   whose result depends on the row count agree); the shared expert through the same
   ``moe`` with ``K = 0`` (= ``rnd(shared(x))``);
3. **combine**: one ``all_gather`` of every rank's route rows (in the storage dtype: the
   values are already rounded to it, so bfloat16 travels as 2 bytes exactly) with a
   16-byte header (route count, routing digest), scattered back by key into ``y [T, K,
   D]``, then the single-process sum: ``rnd(rnd(Σ_k rnd(y[t,k]·w[t,k])) + shared)``, the K
   terms added in float32 in slot order from 0 (the fused kernel's and the reference's
   order). The result does not depend on ``N``: bitwise equal to one process on every
   path, given the same thread count (the one float reduction, the K-sum, runs on every
   rank in the same order; nothing is summed across ranks).

The header's routing digest (CRC-32 of ``idx`` and ``w``) must agree on every rank; a
rank whose replicated computation diverged (e.g. hosts with different float kernels) is
refused with :class:`RoutingMismatch` instead of producing mixed results.
"""

from __future__ import annotations

import os
import re
import signal
import time
import zlib
from types import SimpleNamespace
from typing import Callable

import torch

from ..numerics.group_quant import GroupQuantWeight
from ..numerics.quant import QuantWeight
from ..numerics.rounding import rnd

__all__ = ["ExpertShard", "RemoteExpert", "ExpertParallelOps", "RoutingMismatch", "EXPERT_NAME", "CommStats"]

#: A routed expert's tensor name (canonical, weights and scales): ``...experts.<e>.<rest>``.
#: ``shared_experts.`` does not match (the character before ``experts`` must be a dot).
EXPERT_NAME = re.compile(r"(?:^|\.)experts\.(\d+)\.")

_HEADER = 16  # bytes: int64 route count, int64 routing digest


class RoutingMismatch(RuntimeError):
    """The replicated routing (expert indices / weights) differs between ranks."""


class RemoteExpert:
    """Placeholder for a routed expert weight that lives on another rank. Any use other than
    being passed along raises (a local kernel must never see it)."""

    __slots__ = ("name", "rank")

    def __init__(self, name: str, rank: int):
        self.name, self.rank = name, rank

    def __repr__(self) -> str:
        return f"RemoteExpert({self.name!r} on rank {self.rank})"

    @property
    def shape(self):
        raise RuntimeError(f"{self!r} is not loaded on this rank (expert parallelism)")


class ExpertShard:
    """Which routed experts rank ``rank`` of ``world_size`` owns.

    Args:
        n_experts: routed experts per layer ``E``; world_size: ``N`` ranks; rank in ``[0, N)``.
    Raises:
        ValueError: ``E % N != 0`` (names both and the divisors of ``E``), ``N < 1`` or a
            rank outside ``[0, N)``.
    """

    def __init__(self, n_experts: int, world_size: int, rank: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if n_experts < 1:
            raise ValueError(f"expert parallelism needs a model with routed experts: n_routed_experts={n_experts}")
        if n_experts % world_size:
            divisors = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
            raise ValueError(f"expert parallelism needs the number of ranks to divide the routed experts: "
                             f"n_routed_experts={n_experts}, ranks={world_size}; use one of {divisors}")
        self.n_experts, self.world_size, self.rank = n_experts, world_size, rank
        self.per_rank = n_experts // world_size
        self.first = rank * self.per_rank

    def owner(self, expert: int) -> int:
        """The rank that holds ``expert``."""
        return expert // self.per_rank

    def is_local(self, expert: int) -> bool:
        return self.owner(expert) == self.rank

    def select(self, rejected: set[str] | None = None) -> Callable[[str], bool]:
        """A ``load_checkpoint(select=...)`` predicate: every tensor but other ranks' routed
        experts; the rejected names are added to ``rejected``."""
        def keep(name: str) -> bool:
            m = EXPERT_NAME.search(name)
            ok = m is None or self.is_local(int(m.group(1)))
            if not ok and rejected is not None:
                rejected.add(name)
            return ok
        return keep

    def placeholders(self, rejected: set[str]) -> dict[str, RemoteExpert]:
        """``{name: RemoteExpert}`` for the rejected weight names (scales are folded into
        their weights on load, so only ``*.weight`` names get a placeholder)."""
        return {n: RemoteExpert(n, self.owner(int(EXPERT_NAME.search(n).group(1))))
                for n in sorted(rejected) if n.endswith(".weight")}


class CommStats:
    """Per-call combine records, the list ``log`` of ``(T, bytes_sent, bytes_recv, seconds,
    wait)``: this rank's buffer, the other ranks' buffers, the wall time inside the
    all-gather, and (split timing only, else 0) the time in a barrier just before it, i.e.
    waiting for the slowest rank, which the all-gather's time then no longer contains."""

    def __init__(self):
        self.log: list[tuple[int, int, int, float, float]] = []

    def add(self, T: int, sent: int, recv: int, sec: float, wait: float = 0.0) -> None:
        self.log.append((T, sent, recv, sec, wait))

    def reset(self) -> None:
        self.log.clear()

    def summary(self, layers: int, step_seconds: list[float]) -> str:
        """One line: the prefill's combines, then per decode step (``layers`` combines each,
        the log after the first ``layers``) the bytes this rank sent and received, the time
        inside the collective (transfer + waiting for the slowest rank) and its share of
        the mean decode step wall time ``step_seconds``."""
        pre, dec = self.log[:layers], self.log[layers:]
        kib = 1024.0
        out = (f"MoE combine (this rank, {layers} layers): prefill {sum(r[1] for r in pre) / kib:.1f} KiB sent, "
               f"{sum(r[2] for r in pre) / kib:.1f} KiB received, {sum(r[3] for r in pre) * 1e3:.2f} ms")
        steps = len(dec) // layers if layers else 0
        if steps:
            comm = sum(r[3] for r in dec) / steps
            wait = sum(r[4] for r in dec) / steps
            out += (f"; decode ({steps} steps) per step: {sum(r[1] for r in dec) / steps / kib:.1f} KiB sent, "
                    f"{sum(r[2] for r in dec) / steps / kib:.1f} KiB received, {comm * 1e3:.2f} ms in the all-gather")
            if wait:
                out += f" (+ {wait * 1e3:.2f} ms waiting for the slowest rank)"
            if step_seconds:
                step = sum(step_seconds) / len(step_seconds)
                out += f" = {comm / step:.1%} of a {step * 1e3:.2f} ms step"
        return out


def _null_expert(D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float SwiGLU expert of intermediate size 0: its output is exactly 0."""
    z = torch.zeros(0, D, dtype=torch.float32)
    return z, z.clone(), torch.zeros(D, 0, dtype=torch.float32)


def _digest(idx: torch.Tensor, w: torch.Tensor) -> int:
    c = zlib.crc32(idx.contiguous().numpy().tobytes())
    return zlib.crc32(w.detach().float().contiguous().numpy().tobytes(), c)


class ExpertParallelOps(SimpleNamespace):
    """The engine's ``ops`` namespace with ``moe`` replaced by the expert-parallel step (see
    the module docstring) and ``prepare_weights`` preparing only the local weights.

    Args:
        inner: the backend's ops namespace (``REFERENCE_OPS`` / ``FUSED_OPS`` of the model).
        shard: this rank's :class:`ExpertShard`.
        group: the ``torch.distributed`` process group of the ranks (None: the default one).
        on_fault: called with the exception, the collective's name and the seconds it waited
            when a collective fails (diagnoses which rank stopped, see :mod:`.group`); it
            should raise.
        fault: fault injection for tests, ``(rank, call, action)``: rank ``rank`` sends itself
            SIGKILL (``"kill"``: dies), SIGSTOP (``"stop"``: stops answering, threads
            included) or sleeps (``"sleep<s>"``) at the start of its ``call``-th ``moe``
            (1-based); see :func:`parse_fault`.
        split_timing: a barrier before each combine, timed apart (``CommStats``): the
            transfer alone vs waiting for the slowest rank (one more collective per layer;
            ``LLM_KERNELS_EP_TIMING=split``).
    """

    def __init__(self, inner: SimpleNamespace, shard: ExpertShard, group=None,
                 on_fault: Callable[[BaseException, str, float], None] | None = None,
                 fault: tuple[int, int, str] | None = None, split_timing: bool = False):
        super().__init__(**vars(inner))
        self._inner, self._shard, self._group, self._on_fault = inner, shard, group, on_fault
        self.stats = CommStats()
        self.moe = self._moe
        self.prepare_weights = self._prepare_weights
        self._calls = 0
        self._fault = fault
        self.split_timing = split_timing

    # ------------------------------------------------------------------ load time
    def _prepare_weights(self, weights: dict, cfg, consume: bool = False) -> dict:
        """The inner ``prepare_weights`` on the local tensors; the placeholders pass through."""
        remote = {n: w for n, w in weights.items() if isinstance(w, RemoteExpert)}
        local = {n: w for n, w in weights.items() if n not in remote}
        out = self._inner.prepare_weights(local, cfg, consume=consume)
        if consume:
            weights.update(out)
        return {n: remote[n] if n in remote else out[n] for n in weights}

    # ------------------------------------------------------------------ the MoE step
    def _moe(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: list, shared: tuple,
             *, swiglu_limit: float, dtype: torch.dtype) -> torch.Tensor:
        """Expert-parallel ``moe`` (same contract as the stage): x [T, D]; weights / indices
        [T, K]; experts[e] = (w1, w3, w2) (RemoteExpert for other ranks'); shared (w1, w3, w2).
        Returns [T, D] float32 holding ``dtype`` values. Raises IndexError for an expert id
        outside [0, E), :class:`RoutingMismatch` when ranks disagree on the routing, and
        whatever ``on_fault`` raises when the collective fails."""
        import torch.distributed as dist

        sh, inner = self._shard, self._inner
        self._calls += 1
        inject_fault(self._fault, sh.rank, self._calls)
        T, K = indices.shape
        D = x.shape[-1]
        E, N = sh.n_experts, sh.world_size
        if len(experts) != E:
            raise ValueError(f"experts must list all {E} routed experts, got {len(experts)}")
        idx = indices.detach().long().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
            raise IndexError(f"expert index outside [0, {E})")
        owner = idx // sh.per_rank                       # [T*K], key t*K + k
        counts = torch.bincount(owner, minlength=N) if idx.numel() else torch.zeros(N, dtype=torch.long)
        mine = (owner == sh.rank).nonzero().reshape(-1)  # dispatch: this rank's keys, ascending
        null = _null_expert(D)
        if mine.numel():
            y_local = inner.moe(x[mine // K], torch.ones(mine.numel(), 1), idx[mine].view(-1, 1), experts, null,
                                swiglu_limit=swiglu_limit, dtype=dtype)
        else:
            y_local = torch.zeros(0, D)
        shared_out = inner.moe(x, torch.zeros(T, 0), torch.zeros(T, 0, dtype=torch.long), experts, shared,
                               swiglu_limit=swiglu_limit, dtype=dtype)
        # ---- combine: all-gather the route rows (storage dtype, exact) + header
        wire = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        esz = torch.finfo(wire).bits // 8
        maxn = int(counts.max()) if N else 0
        buf = torch.zeros(_HEADER + maxn * D * esz, dtype=torch.uint8)
        head = buf[:_HEADER].view(torch.int64)
        head[0] = int(mine.numel())
        head[1] = _digest(indices, weights)
        if mine.numel():
            buf[_HEADER:_HEADER + mine.numel() * D * esz] = y_local.to(wire).contiguous().view(-1).view(torch.uint8)
        outs = [torch.empty_like(buf) for _ in range(N)]
        t0 = time.perf_counter()
        wait = 0.0
        try:
            if self.split_timing:  # absorb the ranks' imbalance first: the all-gather then times the transfer
                dist.barrier(group=self._group)
                wait = time.perf_counter() - t0
                t0 = time.perf_counter()
            dist.all_gather(outs, buf, group=self._group)
        except Exception as e:  # gloo: peer closed / timeout
            if self._on_fault is not None:
                self._on_fault(e, f"the MoE combine (all_gather, call {self._calls})", time.perf_counter() - t0)
            raise
        sec = time.perf_counter() - t0
        self.stats.add(T, buf.numel(), buf.numel() * (N - 1), sec, wait)
        y = torch.zeros(T * K, D)
        for r in range(N):
            h = outs[r][:_HEADER].view(torch.int64)
            if int(h[0]) != int(counts[r]) or int(h[1]) != int(head[1]):
                raise RoutingMismatch(f"rank {r} routed this MoE step differently from rank {sh.rank} (routes "
                                      f"{int(h[0])} vs {int(counts[r])} expected, digest {int(h[1]):#x} vs "
                                      f"{int(head[1]):#x}): the replicated layers must compute bitwise alike on "
                                      "every rank (same kernels tier, thread count, dtype, quant and backend)")
            n = int(counts[r])
            if n:
                rows = outs[r][_HEADER:_HEADER + n * D * esz].view(wire).view(n, D).float()
                y[(owner == r).nonzero().reshape(-1)] = rows
        y = y.view(T, K, D)
        w = weights.detach().float()
        acc = torch.zeros(T, D)
        for k in range(K):  # slot order from 0, float32: the single-process K-sum
            acc = acc + rnd(y[:, k] * w[:, k:k + 1], dtype)
        return rnd(rnd(acc, dtype) + shared_out, dtype)


FAULT_ENV = "LLM_KERNELS_EP_FAULT"


def parse_fault(text: str | None) -> tuple[int, int, str] | None:
    """``"<rank>:<moe call>:<action>"`` (the :data:`FAULT_ENV` variable) -> a tuple, None for
    unset / empty. ``action``: ``kill`` (SIGKILL), ``stop`` (SIGSTOP) or ``sleep<seconds>``
    (e.g. ``sleep8``: a slow rank); call 0 = right after loading, before the ranks meet
    (:meth:`.runner.RankContext.wrap`). With one expert shard per pipeline stage the call
    number counts the rank's pipeline transfers instead (:class:`.pipeline.StageLink`). Raises ValueError naming the variable otherwise."""
    if not text:
        return None
    parts = text.split(":")
    ok = (len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit()
          and (parts[2] in ("kill", "stop") or re.fullmatch(r"sleep[0-9.]+", parts[2]) is not None))
    if not ok:
        raise ValueError(f"{FAULT_ENV} must be '<rank>:<moe call, 0 = after loading>:<kill|stop|sleep<seconds>>', "
                         f"got {text!r}")
    return int(parts[0]), int(parts[1]), parts[2]


def inject_fault(fault: tuple[int, int, str] | None, rank: int, call: int) -> None:
    """Carry out ``fault`` (:func:`parse_fault`) when it is for ``rank`` at ``call``."""
    if fault is None or fault[:2] != (rank, call):
        return
    if fault[2].startswith("sleep"):
        time.sleep(float(fault[2][5:]))
    else:
        os.kill(os.getpid(), signal.SIGKILL if fault[2] == "kill" else signal.SIGSTOP)


def local_bytes(weights: dict) -> int:
    """Bytes of the tensors ``weights`` holds on this rank: a tensor's ``numel * element_size``,
    an INT8 weight's ``qweight`` + ``scale``, else the object's ``nbytes`` (packed / MXFP4
    forms); placeholders count 0."""
    tot = 0
    for w in weights.values():
        if isinstance(w, RemoteExpert):
            continue
        if isinstance(w, torch.Tensor):
            tot += w.numel() * w.element_size()
        elif type(w) in (QuantWeight, GroupQuantWeight):  # exact: a packed subclass rebuilds qweight
            tot += sum(t.numel() * t.element_size() for t in (w.qweight, w.scale))
        else:
            tot += int(getattr(w, "nbytes", 0) or 0)
    return tot
