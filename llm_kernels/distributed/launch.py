"""``--nproc N``: start N local ranks of the same command (the ``torchrun`` convention:
each rank is ``python -m llm_kernels <command> ...`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT`` in its environment) and supervise them.

When one rank exits with an error, the others detect it themselves (see :mod:`.group`) and
exit; the launcher waits up to ``grace`` seconds for that, then kills the rest (SIGKILL:
also a stopped process) and returns 1 with an error naming the first rank that failed.
Interrupted (Ctrl-C, which a terminal sends to every rank as well), it gives the ranks
``grace`` seconds to stop by themselves, kills the rest, and returns 0 when every rank
exited with 0 (a server over ranks stops cleanly), else 130.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

__all__ = ["spawn_local", "free_port", "GRACE_S"]

GRACE_S = 15.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stopped(pid: int) -> bool:
    """True when process ``pid`` is stopped (state ``T`` in ``/proc/<pid>/stat``; Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def spawn_local(argv: list[str], nproc: int, grace: float = GRACE_S, env: dict | None = None,
                command: list[str] | None = None, addr: str = "127.0.0.1", port: int | None = None,
                prefix: Callable[[int], list[str]] | None = None) -> int:
    """Run ``python -m llm_kernels *argv`` as ``nproc`` ranks on this host; returns 0 when
    every rank succeeded, else 1 after printing which rank failed first.

    Args:
        argv: the command line after ``python -m llm_kernels`` (each rank parses it).
        nproc: ranks (>= 1).
        grace: seconds the other ranks get to exit by themselves after one failed (they
            detect it within seconds, see :mod:`.group`); a rank found stopped (SIGSTOP) is
            killed at once.
        env: extra environment for every rank.
        command: run this command line instead of ``python -m llm_kernels *argv``.
        addr, port: the rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``; default a free port).
        prefix: ``prefix(rank)`` is prepended to rank ``rank``'s command line (e.g. ``ip
            netns exec NS``: it execs, so the process id stays the rank's; see :mod:`.netns`).
    Raises ValueError for ``nproc < 1``.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = port or free_port()
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        e = dict(os.environ, **(env or {}), MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(r),
                 WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc))
        e.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        e.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # c10d's retry warnings; our errors name the rank
        cmd = command or [sys.executable, "-m", "llm_kernels", *argv]
        procs.append(subprocess.Popen([*(prefix(r) if prefix else []), *cmd], env=e))
    first: tuple[int, int] | None = None
    stopped: list[int] = []
    killed: list[int] = []  # by the launcher, after the grace period
    deadline = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            for r, c in enumerate(codes):
                if c not in (None, 0) and first is None:
                    first, deadline = (r, c), time.monotonic() + grace
            if all(c is not None for c in codes):
                break
            if first is not None:
                for r, c in enumerate(codes):
                    if c is None and r not in stopped and _stopped(procs[r].pid):
                        print(f"error: rank {r} is stopped (SIGSTOP / suspended); killing it", file=sys.stderr)
                        stopped.append(r)
                        procs[r].kill()
            if deadline is not None and time.monotonic() > deadline:
                left = [r for r, c in enumerate(codes) if c is None]
                print(f"error: rank{'s' if len(left) > 1 else ''} {', '.join(map(str, left))} did not exit within "
                      f"{grace:g} s after rank {first[0]} failed; killing", file=sys.stderr)
                for r in left:
                    (stopped if _stopped(procs[r].pid) else killed).append(r)
                    procs[r].kill()
                for r in left:
                    procs[r].wait()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank too: give them ``grace`` s to stop (a server stops cleanly)
        end = time.monotonic() + grace
        try:
            while any(p.poll() is None for p in procs) and time.monotonic() < end:
                time.sleep(0.05)
        except KeyboardInterrupt:
            pass
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if all(p.returncode == 0 for p in procs):
            return 0
        print(f"error: interrupted; rank exit codes {[p.returncode for p in procs]}", file=sys.stderr)
        return 130
    if first is None:
        return 0
    r, c = first
    died = [(q, p.returncode) for q, p in enumerate(procs) if q not in stopped + killed and (p.returncode or 0) < 0]
    why = [f"rank {q} was {_exit_text(code)}" for q, code in died] + [f"rank {q} was stopped" for q in stopped]
    print(f"error: {'; '.join(why) or f'rank {r} of {nproc} failed first ({_exit_text(c)})'}; the run of {nproc} "
          "ranks was aborted and its output is not complete", file=sys.stderr)
    return 1
