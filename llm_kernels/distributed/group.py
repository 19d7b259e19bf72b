"""The ranks' process group: ``torch.distributed`` with the gloo backend over TCP, a
heartbeat per rank, and the diagnosis that names a rank that died or stopped answering.

Environment (the ``torchrun`` convention, also set by :func:`.launch.spawn_local`):
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (the rendezvous TCP store; rank
0 hosts it unless ``TORCHELASTIC_USE_AGENT_STORE=True``, i.e. torchrun's agent does),
optionally ``LOCAL_WORLD_SIZE`` (ranks on this host: the default thread split).

Faults. Every collective runs under the group's ``timeout`` (gloo's own timeout). When one
fails (a peer's socket closed: the rank was killed or exited; or the timeout passed: it
stopped answering), :meth:`RankGroup.fail` reads the heartbeat counters every rank bumps
every :data:`HEARTBEAT_S` seconds from a background thread over its own store connection,
waits three periods and reads them again: a rank whose counter did not move and that left
no failure note is named as the one that stopped. The failing rank leaves its own note
(``failed/<rank>``) so that the ranks behind it in the cascade are not blamed. The
rendezvous store itself unreachable means rank 0 (or torchrun's agent) is gone; a failing
rank 0 therefore stays :data:`LINGER_S` seconds before it exits (:meth:`RankGroup.linger`).
Phases with no natural timeout (loading a shard) end in :meth:`RankGroup.meet`, a
barrier through the store that waits as long as the missing ranks' heartbeats move.
Detection bounds: the ranks talking to a killed rank fail within about 2 s (socket closed +
diagnosis), the rest of the ring as the failing ones exit (rank 0 last, after
``LINGER_S``); a stopped rank within ``timeout`` + 2 s; every rank is gone by about
``timeout`` + 10 s.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["RankGroup", "RankFailure", "env_world", "HEARTBEAT_S"]

HEARTBEAT_S = 0.5
LINGER_S = 3 * HEARTBEAT_S + 3.5  # a failing store host stays this long for the others' diagnosis
MEET_BOUND_S = 3600.0  # RankGroup.meet: the longest wait for ranks alive but not done
_PREFIX = "llmk/"


class RankFailure(RuntimeError):
    """A peer rank died, stopped answering, or the ranks disagree; the message names the rank."""


def _env_int(name: str) -> int:
    v = os.environ.get(name, "")
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def env_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` from ``RANK`` / ``WORLD_SIZE`` (torchrun or our launcher), None
    when they are not set. Raises ValueError for non-integers, ``WORLD_SIZE < 1`` or a rank
    outside ``[0, WORLD_SIZE)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE), WORLD_SIZE >= 1; got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


class RankGroup:
    """Join the process group of ``world_size`` ranks (gloo, TCP) and start the heartbeat.

    Args:
        rank, world_size: this rank and the number of ranks.
        timeout: seconds a collective (and the rendezvous) may wait for a peer.
        addr, port: the rendezvous store (default ``MASTER_ADDR`` / ``MASTER_PORT``).
    Raises:
        ValueError: ``MASTER_ADDR`` / ``MASTER_PORT`` missing or bad, ``timeout <= 0``.
        RankFailure: the rendezvous did not complete within ``timeout``.
    """

    def __init__(self, rank: int, world_size: int, timeout: float, addr: str | None = None, port: int | None = None):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        addr = addr or os.environ.get("MASTER_ADDR")
        if not addr or (port is None and "MASTER_PORT" not in os.environ):
            raise ValueError("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them; so does --nproc)")
        port = port if port is not None else _env_int("MASTER_PORT")
        self.rank, self.world_size, self.timeout, self.addr, self.port = rank, world_size, timeout, addr, port
        td = timedelta(seconds=timeout)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        self._hosts_store = rank == 0 and not agent
        try:
            self.store = dist.TCPStore(addr, port, world_size, is_master=self._hosts_store, timeout=td,
                                       wait_for_workers=False)
            dist.init_process_group("gloo", store=dist.PrefixStore(_PREFIX + "pg", self.store), rank=rank,
                                    world_size=world_size, timeout=td)
        except (RuntimeError, dist.DistStoreError) as e:
            raise RankFailure(f"rank {rank}: the rendezvous of {world_size} ranks at {addr}:{port} did not complete "
                              f"within {timeout:g} s: {_first_line(e)}") from None
        self._meets = 0
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="llmk-heartbeat", daemon=True)
        self._beat.start()

    # ------------------------------------------------------------------ heartbeat
    def _client(self, timeout: float) -> dist.TCPStore:
        return dist.TCPStore(self.addr, self.port, is_master=False, timeout=timedelta(seconds=timeout))

    def _heartbeat(self) -> None:
        try:
            st = self._client(self.timeout)
            while not self._stop.is_set():
                st.add(f"{_PREFIX}hb/{self.rank}", 1)
                self._stop.wait(HEARTBEAT_S)
        except Exception:  # the store is gone: the collectives will say so
            return

    # ------------------------------------------------------------------ faults
    @property
    def hosts_store(self) -> bool:
        """True when this process hosts the rendezvous store (rank 0 unless torchrun's agent does)."""
        return self._hosts_store

    def linger(self) -> None:
        """Before a failing store host exits: give the others time to read the heartbeats and
        notes (:meth:`diagnose` takes three heartbeat periods) so they name the right rank."""
        if self._hosts_store:
            time.sleep(LINGER_S)

    def note(self, reason: str) -> None:
        """Leave this rank's failure note for the others' diagnosis (best effort)."""
        try:
            self._client(2.0).set(f"{_PREFIX}failed/{self.rank}", reason[:500])
        except Exception:
            pass

    def diagnose(self) -> str:
        """Which rank stopped: the ranks whose heartbeat did not move for three periods and
        that left no failure note; else the notes; else that none could be named."""
        try:
            st = self._client(3.0)
            before = [st.add(f"{_PREFIX}hb/{r}", 0) for r in range(self.world_size)]
            time.sleep(3 * HEARTBEAT_S)
            after = [st.add(f"{_PREFIX}hb/{r}", 0) for r in range(self.world_size)]
            notes = {}
            for r in range(self.world_size):
                key = f"{_PREFIX}failed/{r}"
                if r != self.rank and st.check([key]):
                    notes[r] = st.get(key).decode(errors="replace")
        except Exception as e:
            return (f"the rendezvous store at {self.addr}:{self.port} is unreachable, so rank 0 (which hosts it) "
                    f"died or stopped answering ({_first_line(e)})")
        silent = [r for r in range(self.world_size) if r != self.rank and before[r] == after[r] and r not in notes]
        if silent:
            who = ", ".join(str(r) for r in silent)
            return (f"rank{'s' if len(silent) > 1 else ''} {who} stopped answering (killed, crashed or hung: no "
                    f"heartbeat for {3 * HEARTBEAT_S:g} s)")
        if notes:
            return "; ".join(f"rank {r} failed: {n}" for r, n in sorted(notes.items()))
        return "no peer could be named (every heartbeat is alive): a peer is slow or the network dropped"

    def fail(self, exc: BaseException, what: str, waited: float | None = None) -> None:
        """Raise :class:`RankFailure` for a failed collective ``what`` (that waited ``waited``
        seconds), naming the rank."""
        self.note(f"{what} failed on rank {self.rank}")
        after = f"after {waited:.1f} s, " if waited is not None else ""
        raise RankFailure(f"rank {self.rank}: {what} failed ({after}timeout {self.timeout:g} s): {self.diagnose()} "
                          f"[{type(exc).__name__}: {_first_line(exc)}]") from None

    def meet(self, stage: str, bound: float = MEET_BOUND_S) -> None:
        """Wait until every rank has reached ``stage`` (e.g. finished loading), for as long
        as the missing ones are alive: no collective timeout applies (a rank loading a large
        shard slowly is not a failure), but a missing rank whose heartbeat stops for three
        periods (or that left a failure note) fails this rank at once, naming it; ``bound``
        seconds caps the wait for ranks alive but stuck. Raises :class:`RankFailure`."""
        self._meets += 1
        key = f"{_PREFIX}meet/{self._meets}/"
        t0 = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}
        try:
            st = self._client(self.timeout)
            st.set(key + str(self.rank), "1")
            while True:
                missing = [r for r in range(self.world_size) if not st.check([key + str(r)])]
                if not missing:
                    return
                now = time.monotonic()
                for r in missing:
                    if st.check([f"{_PREFIX}failed/{r}"]):
                        note = st.get(f"{_PREFIX}failed/{r}").decode(errors="replace")
                        raise RankFailure(f"rank {self.rank}: waiting for every rank to {stage}: rank {r} failed: "
                                          f"{note}")
                    c = st.add(f"{_PREFIX}hb/{r}", 0)
                    if r not in seen or seen[r][0] != c:
                        seen[r] = (c, now)
                    elif now - seen[r][1] > 3 * HEARTBEAT_S:
                        raise RankFailure(f"rank {self.rank}: waiting for every rank to {stage}: rank {r} stopped "
                                          f"answering (killed, crashed or hung: no heartbeat for {3 * HEARTBEAT_S:g} s)")
                if now - t0 > bound:
                    raise RankFailure(f"rank {self.rank}: ranks {missing} did not {stage} within {bound:g} s (alive, "
                                      "but not done)")
                time.sleep(HEARTBEAT_S / 2)
        except RankFailure:
            raise
        except Exception as e:
            raise RankFailure(f"rank {self.rank}: waiting for every rank to {stage}: the rendezvous store at "
                              f"{self.addr}:{self.port} is unreachable, so rank 0 (which hosts it) died or stopped "
                              f"answering ({_first_line(e)})") from None

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data`` (all of the same length), rank order; a failure raises
        :class:`RankFailure`."""
        import torch

        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        t0 = time.perf_counter()
        try:
            dist.all_gather(outs, t)
        except Exception as e:
            self.fail(e, what, time.perf_counter() - t0)
        return [bytes(o.numpy().tobytes()) for o in outs]

    def barrier(self, what: str) -> None:
        """All ranks reach this point (an all-gather of one byte: gloo's barrier has no
        per-call diagnosis); a failure raises :class:`RankFailure`."""
        self.all_gather_bytes(b"\x01", what)

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        self._stop.set()
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _first_line(e: BaseException) -> str:
    """The first sentence of ``e``'s message, without gloo's ``[file.cc:123] `` prefix."""
    s = str(e).strip().splitlines()
    s = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", s[0]) if s else type(e).__name__
    return s.split(". ")[0][:300]
