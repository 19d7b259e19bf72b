"""Pipeline parallelism (PP): contiguous layer ranges on successive stages, the hidden rows
handed from one stage to the next with point-to-point ``send`` / ``recv``, the head's logits
broadcast from the last stage to every rank.

:class:`StageLink` is the engine's ``pipe`` (:class:`~llm_kernels.runtime.engine_core.PipelineLink`):
per step, stage ``s > 0`` receives the rows of its counterpart (same expert shard) in stage
``s - 1`` (Qwen3's residual stream ``[ΣT, hidden]``, DeepSeek-V4's mHC streams
``[ΣT, hc_mult, D]``; float32 at any activation dtype, as the layers hand them on, with
values rounded to the dtype; sent as raw bytes), runs its layers and sends its
output on; the last stage runs the head, and one ``broadcast`` from the first rank of the
last stage gives every rank the float32 logits of the step's head rows. Every rank
therefore returns the same logits and can pick the same next token (``generate``).

Exactness: a layer computes the same bits on whichever rank runs it (same code, inputs and
thread count) and the transfers copy bytes, so the logits are bitwise the one-process
logits on every path (tested).

Schedule: a send does not wait for the receiver (``isend``; :meth:`StageLink.flush` waits
before the logits broadcast), and a chunked step (a prefill longer than
``prefill_chunk``) broadcasts its logits once after its last chunk, so stage ``s`` runs
chunk ``k + 1`` while stage ``s + 1`` runs chunk ``k``: a prefill of ``C`` chunks over
``P`` stages takes about ``(C + P - 1)`` chunk-stage times instead of ``C · P``. A decode
step is one chunk: its stages run one after another, unless the driver keeps steps of
several sequence groups in flight (``EngineCore.submit``: the logits broadcast posted with
:meth:`StageLink.share_logits_async`); docs/distributed.md, "Schedule".

Failures of a transfer go through :meth:`RankGroup.fail`, which names the rank that died or
stopped answering.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .expert_parallel import inject_fault
from .layout import RankLayout

__all__ = ["StageLink", "PipeStats"]


class PipeStats:
    """Bytes and seconds of the pipeline transfers (hidden rows sent / received, logits
    received or broadcast), per call kind."""

    def __init__(self):
        self.sent = self.recv = self.logits = 0
        self.seconds = 0.0
        self.calls = 0  # transfers
        self.steps = 0  # steps with head rows (one logits broadcast each)

    def summary(self) -> str:
        """``pipeline, this rank, mean of N steps (prefill included): X KiB hidden sent + Y KiB
        received, Z KiB logits, W ms in transfers``."""
        n = max(self.steps, 1)
        kib = 1024.0
        return (f"pipeline, this rank, mean of {self.steps} steps (prefill included): {self.sent / n / kib:.1f} KiB "
                f"hidden sent + {self.recv / n / kib:.1f} KiB received, {self.logits / n / kib:.1f} KiB logits, "
                f"{self.seconds / n * 1e3:.2f} ms in transfers (waiting for the other stages included)")


class StageLink:
    """This rank's pipeline link (see the module docstring).

    Args:
        layout: this rank's :class:`RankLayout`.
        on_fault: ``RankGroup.fail`` (raises RankFailure naming the rank) for a failed transfer.
        fault: a test fault (:func:`.expert_parallel.parse_fault`) whose call number counts
            this rank's transfers (1 = the first), or None.
    """

    def __init__(self, layout: RankLayout, on_fault, fault=None):
        self.layout, self.fault = layout, fault
        self.is_first, self.is_last = layout.is_first_stage, layout.is_last_stage
        self.stages = layout.pp
        self._fail = on_fault
        self._src_logits = layout.stage_ranks(layout.pp - 1)[0]
        self._pending: list = []  # (work, buffer kept alive, what) of posted sends
        self.stats = PipeStats()

    def _run(self, what: str, fn) -> None:
        inject_fault(self.fault, self.layout.rank, self.stats.calls + 1)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:
            self._fail(e, what, time.perf_counter() - t0)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The rows stage ``stage - 1`` sent (``shape``, ``dtype``)."""
        x = torch.empty(shape, dtype=dtype)
        src = self.layout.peer(self.layout.stage - 1)
        self._run(f"receiving the hidden rows from rank {src} (stage {self.layout.stage - 1})",
                  lambda: dist.recv(x.view(-1).view(torch.uint8), src=src))
        self.stats.recv += x.numel() * x.element_size()
        return x

    def send_hidden(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Post the send of this stage's output rows to stage ``stage + 1``, which receives
        them as ``dtype``, and return without waiting for it (:meth:`flush` waits), so this
        stage can go on with the next chunk of a pipelined prefill. Raises ValueError when
        ``x`` is of another dtype (the receiver's buffer would not match: gloo aborts the
        process on a size mismatch)."""
        if x.dtype != dtype:
            raise ValueError(f"stage {self.layout.stage}: the hidden rows are {x.dtype}, the next stage expects {dtype}")
        buf = x.contiguous().view(-1).view(torch.uint8)
        dst = self.layout.peer(self.layout.stage + 1)
        what = f"sending the hidden rows to rank {dst} (stage {self.layout.stage + 1})"
        holder = []
        self._run(what, lambda: holder.append(dist.isend(buf, dst=dst)))
        self._pending.append((holder[0], buf, what))
        self.stats.sent += buf.numel()

    def flush(self) -> None:
        """Wait for this stage's posted sends (in order); a failed one raises RankFailure."""
        while self._pending:
            work, _, what = self._pending.pop(0)
            t0 = time.perf_counter()
            try:
                work.wait()
            except Exception as e:
                self._pending.clear()
                self._fail(e, what, time.perf_counter() - t0)
            self.stats.seconds += time.perf_counter() - t0

    def share_logits(self, logits: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        """The last stage's float32 logits ``shape`` on every rank (one broadcast from the
        last stage's first rank; the other ranks of that stage hold the same values), after
        this stage's posted sends completed (:meth:`flush`)."""
        return self.share_logits_async(logits, shape)()

    def share_logits_async(self, logits: torch.Tensor | None, shape: tuple[int, int]):
        """:meth:`share_logits` posted, not waited for (the engine's ``submit``): returns a
        callable that waits for the broadcast and this stage's sends, then returns the
        logits. The broadcasts of several pending steps complete in posting order."""
        src = self._src_logits
        if self.layout.rank == src:
            if logits is None or tuple(logits.shape) != tuple(shape) or logits.dtype != torch.float32:
                raise ValueError(f"the last stage's logits must be float32 {list(shape)}, got "
                                 f"{None if logits is None else (logits.dtype, list(logits.shape))}")
            buf = logits.contiguous()
        else:
            buf = torch.empty(shape, dtype=torch.float32)
        what = f"broadcasting the logits from rank {src} (the last stage)"
        holder = []
        self._run(what, lambda: holder.append(dist.broadcast(buf, src=src, async_op=True)))
        self.stats.logits += buf.numel() * 4
        self.stats.steps += 1

        def get() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                holder[0].wait()
            except Exception as e:
                self._fail(e, what, time.perf_counter() - t0)
            self.stats.seconds += time.perf_counter() - t0
            self.flush()
            return buf

        return get
