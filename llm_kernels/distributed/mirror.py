"""Serving over ranks: rank 0 runs the server and its scheduler; every other rank repeats
rank 0's engine calls, in order, on its own part of the model.

:class:`EngineMirror` (rank 0) wraps the engine: each call that changes sequences
(``add_sequence``, ``release``, ``step``, ``prefill``, ``decode``) is first published through
the rendezvous store (``llmk/mirror/<n>``: the method name and its arguments as JSON: sequence
ids, token ids, step options) and then run locally. :func:`follow` (the other ranks) waits for call ``n``, runs it, and
goes on until rank 0 publishes ``stop``. The engines' steps meet in their collectives (the
expert combine, the pipeline transfers), so every rank runs the same step at the same time
and gets the same logits; calls that raise (a request past the cache, an unknown id) raise
alike on every rank before any collective, and a follower drops the error as rank 0's
scheduler handles its own.

The store carries the calls, not a gloo collective, because a server waits for requests
for as long as it likes: a follower waits on the store with no timeout while rank 0's
heartbeat moves, and names rank 0 when it stops (:class:`~.group.RankFailure`). A call is a
few hundred bytes (token ids); the store keeps the last :data:`KEEP` of them.
"""

from __future__ import annotations

import os
import json
import sys
import threading
import time
from datetime import timedelta

from .group import HEARTBEAT_S, RankFailure

__all__ = ["EngineMirror", "follow", "MIRRORED", "KEEP"]

#: the engine methods a follower repeats (the ones that change the sequences or run steps)
MIRRORED = ("add_sequence", "release", "step", "prefill", "decode")
KEEP = 256  # published calls kept in the store (followers are at most a step behind)
_KEY = "llmk/mirror/"


class EngineMirror:
    """Rank 0's engine for a server over ranks: :data:`MIRRORED` calls are published for the
    other ranks (:func:`follow`) before they run here; anything else is the engine's own.
    Calls are serialised (one at a time, in publication order). :meth:`stop` ends the
    followers' loops. A call failing with :class:`RankFailure` (a peer died mid-step) ends
    the process with exit code 3 after printing the error: the group cannot serve any more."""

    def __init__(self, engine, group):
        self._engine, self._group = engine, group
        self._store = group._client(group.timeout)
        self._n = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        if name == "submit":  # a pending step would need its result() mirrored too
            raise AttributeError("EngineMirror does not mirror submit(): the server's scheduler runs whole steps")
        attr = getattr(self._engine, name)
        if name not in MIRRORED:
            return attr

        def mirrored(*args, **kwargs):
            with self._lock:
                self._publish((name, args, kwargs))
                try:
                    return attr(*args, **kwargs)
                except RankFailure as e:  # a peer is gone: the group cannot serve any more
                    self._group.note(str(e))
                    print(f"error: {e}; the server stops", file=sys.stderr, flush=True)
                    self._group.linger()
                    os._exit(3)

        return mirrored

    def _publish(self, call: tuple) -> None:
        self._n += 1
        try:
            self._store.set(f"{_KEY}{self._n}", json.dumps(call))
            if self._n > KEEP:
                self._store.delete_key(f"{_KEY}{self._n - KEEP}")
        except Exception as e:
            raise RankFailure(f"rank 0: publishing engine call {self._n} ({call[0]}) through the store failed: "
                              f"{type(e).__name__}: {e}") from None

    def stop(self) -> None:
        """Tell the followers to leave :func:`follow` (best effort)."""
        with self._lock:
            try:
                self._publish(("stop", (), {}))
            except RankFailure:
                pass


def follow(engine, group, on_call=None) -> int:
    """Repeat rank 0's engine calls on ``engine`` until it publishes ``stop``; returns the
    number of calls run. A call that raises is dropped (rank 0's raised alike); a
    :class:`RankFailure` (a peer gone in a collective) propagates. Waits for each call with
    no timeout while rank 0's heartbeat moves; raises RankFailure naming rank 0 when it
    stops for three heartbeat periods or left a failure note. ``on_call(name)``: called
    after each call (tests)."""
    st = group._client(group.timeout)
    n = 0
    while True:
        key = f"{_KEY}{n + 1}"
        last_beat, seen_at = None, time.monotonic()
        while True:
            try:
                st.wait([key], timedelta(seconds=3 * HEARTBEAT_S))
                break
            except Exception as e:  # timed out (or the store is gone): is rank 0 alive?
                try:
                    if st.check(["llmk/failed/0"]):
                        note = st.get("llmk/failed/0").decode(errors="replace")
                        raise RankFailure(f"rank {group.rank}: waiting for the server's next engine call: rank 0 "
                                          f"failed: {note}") from None
                    beat = st.add("llmk/hb/0", 0)
                except RankFailure:
                    raise
                except Exception:
                    raise RankFailure(f"rank {group.rank}: waiting for the server's next engine call: the rendezvous "
                                      "store is unreachable, so rank 0 (which hosts it) died or stopped answering "
                                      f"({type(e).__name__})") from None
                now = time.monotonic()
                if beat != last_beat:
                    last_beat, seen_at = beat, now
                elif now - seen_at > 3 * HEARTBEAT_S:
                    raise RankFailure(f"rank {group.rank}: waiting for the server's next engine call: rank 0 stopped "
                                      f"answering (no heartbeat for {3 * HEARTBEAT_S:g} s)") from None
        name, args, kwargs = json.loads(st.get(key))
        n += 1
        if name == "stop":
            return n - 1
        try:
            getattr(engine, name)(*args, **kwargs)
        except RankFailure:
            raise
        except Exception:
            pass  # rank 0's call raised the same (validated before any collective); its scheduler answers
        if on_call is not None:
            on_call(name)
