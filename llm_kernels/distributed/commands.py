"""What ``generate`` and ``bench`` share when they run as one rank of a group (``--nproc N
[--pp K]``, see docs/distributed.md): a seed drawn once for every rank, JSON gathered from
every rank to all, rank 0 alone on stdout, communication counters read around a timed part
and the decode bytes a rank reads from its own part of the model.

Nothing here runs a model; the :class:`~.runner.RankContext` gives the group, the layout and
(after ``wrap``) the expert-parallel ops and the pipeline link whose counters are read.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from typing import Any, Iterator

__all__ = ["shared_seed", "gather_json", "root_stdout", "CommMeter", "comm_parts"]


def gather_json(ctx, obj: Any, what: str) -> list[Any]:
    """``obj`` (JSON-serialisable) of every rank, in rank order, on every rank (two
    all-gathers: the lengths, then the texts padded to the longest). Raises
    :class:`~.group.RankFailure` when a rank is gone."""
    data = json.dumps(obj, sort_keys=True).encode()
    lens = ctx.group.all_gather_bytes(len(data).to_bytes(8, "little"), what + " (sizes)")
    n = max(int.from_bytes(x, "little") for x in lens)
    outs = ctx.group.all_gather_bytes(data.ljust(n, b" "), what)
    return [json.loads(o.decode()) for o in outs]


def shared_seed(ctx, seed: int | None) -> int | None:
    """``seed`` when given; else one fresh seed drawn by rank 0 and used by every rank (a
    sampler seeded per rank from the OS would draw different tokens on each rank, and the
    ranks must feed the same tokens). Returns an int in ``[0, 2**63)`` or the given seed."""
    if seed is not None:
        return seed
    mine = random.SystemRandom().randrange(2 ** 63) if ctx.is_root else 0
    return int(gather_json(ctx, mine, "sharing the sampling seed")[0])


@contextlib.contextmanager
def root_stdout(ctx) -> Iterator[None]:
    """Rank 0 prints as usual; on the other ranks stdout goes nowhere (they run the same
    loop and would print the same text). stderr is kept on every rank (errors)."""
    if ctx.is_root:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        try:
            yield
        finally:
            sink.truncate(0)


class CommMeter:
    """Sums this rank's communication over marked intervals (``start()`` ... ``stop()``):
    the expert combine (``ctx.ops.stats.log``: bytes sent / received, seconds inside the
    all-gather) and the pipeline transfers (``ctx.pipe.stats``: hidden rows sent / received,
    logits, seconds). Seconds include waiting for the other ranks."""

    KEYS = ("ep_sent", "ep_recv", "ep_s", "ep_calls", "pipe_sent", "pipe_recv", "pipe_logits", "pipe_s")

    def __init__(self, ctx):
        self.ctx = ctx
        self.total = dict.fromkeys(self.KEYS, 0.0)
        self._mark: dict[str, float] | None = None

    def _now(self) -> dict[str, float]:
        ops, pipe = self.ctx.ops, self.ctx.pipe
        log = ops.stats.log if ops is not None else []
        st = pipe.stats if pipe is not None else None
        return {"ep_sent": sum(r[1] for r in log), "ep_recv": sum(r[2] for r in log),
                "ep_s": sum(r[3] + r[4] for r in log), "ep_calls": len(log),
                "pipe_sent": st.sent if st else 0, "pipe_recv": st.recv if st else 0,
                "pipe_logits": st.logits if st else 0, "pipe_s": st.seconds if st else 0.0}

    def start(self) -> None:
        self._mark = self._now()

    def stop(self) -> None:
        if self._mark is None:
            return
        now = self._now()
        for k in self.KEYS:
            self.total[k] += now[k] - self._mark[k]
        self._mark = None

    def take(self) -> dict[str, float]:
        """The sums since the last ``take`` (then zero)."""
        out, self.total = self.total, dict.fromkeys(self.KEYS, 0.0)
        return out


def comm_parts(c: dict[str, float], per: float = 1.0) -> list[str]:
    """A :meth:`CommMeter.take` record as text, each figure divided by ``per`` (e.g. the
    steps): ``["MoE combine X KiB sent + Y KiB received in N all-gathers, Z ms", "pipeline
    X KiB hidden sent + Y KiB received, W KiB logits, Z ms"]`` for the axes in use."""
    kib, parts = 1024.0, []
    if c["ep_calls"]:
        parts.append(f"MoE combine {c['ep_sent'] / per / kib:.1f} KiB sent + {c['ep_recv'] / per / kib:.1f} KiB "
                     f"received in {c['ep_calls'] / per:.0f} all-gathers, {c['ep_s'] / per * 1e3:.2f} ms")
    if c["pipe_sent"] or c["pipe_recv"] or c["pipe_logits"]:
        parts.append(f"pipeline {c['pipe_sent'] / per / kib:.1f} KiB hidden sent + {c['pipe_recv'] / per / kib:.1f} KiB "
                     f"received, {c['pipe_logits'] / per / kib:.1f} KiB logits, {c['pipe_s'] / per * 1e3:.2f} ms")
    return parts
